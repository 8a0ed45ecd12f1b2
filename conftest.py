"""Settings for every test run, whatever paths pytest is given (tests/, notebooks/ or one
notebook): the saved notebook outputs are the CPU run's, with training-heavy cells at the
reduced size of quick mode, and with chapter 5's model standing in for OpenAI's GPT-2 (so
they are the same with or without internet access). Notebook kernels started by nbval
inherit these; set a variable yourself to override it. Fixtures live in tests/conftest.py."""

import os

os.environ.setdefault("LLM_COURSE_DEVICE", "cpu")
os.environ.setdefault("LLM_COURSE_QUICK", "1")
os.environ.setdefault("LLM_COURSE_FALLBACK", "1")
