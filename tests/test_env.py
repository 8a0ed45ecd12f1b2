"""utils/core/env.py and utils/core/messages.py: one reading of every switch, one wording of
every unknown name."""

import pytest

from utils.core.download import offline_mode
from utils.core.env import env_flag, env_number
from utils.core.messages import unknown_name
from utils.core.runinfo import fallback_mode


@pytest.mark.parametrize("switch, name", [(offline_mode, "LLM_COURSE_OFFLINE"),
                                          (fallback_mode, "LLM_COURSE_FALLBACK")])
def test_every_switch_reads_yes_and_no_alike_and_refuses_anything_else(monkeypatch, switch, name):
    for value in ("1", "true", "Yes", " ON "):
        monkeypatch.setenv(name, value)
        assert switch() is True
    for value in ("", "0", "false", "No", "off"):
        monkeypatch.setenv(name, value)
        assert switch() is False
    monkeypatch.delenv(name)
    assert switch() is False
    monkeypatch.setenv(name, "maybe")  # a typo is an error that names the variable, not "off"
    with pytest.raises(ValueError, match=f"\\${name}='maybe' is neither on"):
        switch()


def test_numbers_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLM_COURSE_TEST_NUMBER", " 100 ")
    assert env_number("LLM_COURSE_TEST_NUMBER") == 100.0
    monkeypatch.setenv("LLM_COURSE_TEST_NUMBER", "")
    assert env_number("LLM_COURSE_TEST_NUMBER") is None
    monkeypatch.setenv("LLM_COURSE_TEST_NUMBER", "lots")
    with pytest.raises(ValueError, match=r"\$LLM_COURSE_TEST_NUMBER='lots' is not a number"):
        env_number("LLM_COURSE_TEST_NUMBER")
    assert env_flag("LLM_COURSE_TEST_UNSET_SWITCH") is False


def test_unknown_names_get_the_closest_suggestion_and_the_choices():
    assert unknown_name("model name", "gpt2-smal", ["gpt2-small", "gpt2-medium"]) == (
        "Unknown model name 'gpt2-smal'. Did you mean 'gpt2-small'? "
        "Choose one of: gpt2-small, gpt2-medium.")
    assert unknown_name("asset", "zzz", ["a", "b"]) == "Unknown asset 'zzz'. Choose one of: a, b."
