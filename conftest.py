"""Settings for every test run, whatever paths pytest is given (tests/, notebooks/ or one
notebook): the saved notebook outputs are the CPU run's, with the stand-in in place of
OpenAI's GPT-2 (so they are the same with or without internet access), and no download of model weights (over 100
MB) unless you ask for it. `utils.core.runinfo.SAVED_OUTPUT_SETTINGS` lists them; notebook
kernels started by nbval inherit them; set a variable yourself to override it. Fixtures
live in tests/conftest.py."""

from utils.core.runinfo import use_saved_output_settings

use_saved_output_settings()
