"""
Reading token usage from answers without parsing them whole.
"""

import json

from hypothesis import given
from hypothesis import strategies as st

from aigateway.proxy.usage import Usage, scan


def test_stream_usage_null_then_object():
    """
    Every event of an OpenAI stream with include_usage has "usage": null
    but the last; the model of that event is taken.
    """
    stream = (
        b'data: {"model":"m","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
        b'data: {"model":"m2","choices":[],"usage":{"prompt_tokens":1,'
        b'"completion_tokens":2,"total_tokens":3}}\n\ndata: [DONE]\n\n'
    )
    assert scan(stream) == Usage("m2", 1, 2, 3)
    assert scan(b'data: {"model":"m","usage":null}\n\n') is None


def test_text_that_looks_like_usage_is_not_usage():
    """
    A message that quotes a usage object is escaped JSON, not a key.
    """
    document = json.dumps(
        {
            "model": "m",
            "choices": [{"message": {"content": '"usage": {"prompt_tokens": 99}'}}],
        }
    ).encode()
    assert scan(document) is None


def test_anthropic_style_names_and_pretty_printing():
    document = json.dumps(
        {"model": "claude", "usage": {"input_tokens": 5, "output_tokens": 7}}, indent=2
    ).encode()
    assert scan(document) == Usage("claude", 5, 7, 12)


@given(
    model=st.text(
        alphabet=st.characters(
            blacklist_characters='"\\', blacklist_categories=("Cs",)
        ),
        min_size=1,
        max_size=40,
    ),
    prompt=st.integers(0, 10**9),
    completion=st.integers(0, 10**9),
    total=st.integers(0, 10**9),
    content=st.text(max_size=200),
    indent=st.sampled_from([None, 2]),
    order=st.permutations(["prompt_tokens", "completion_tokens", "total_tokens"]),
)
def test_agrees_with_json(model, prompt, completion, total, content, indent, order):
    """
    Whatever the content and the order of the counts (OpenAI's own order
    is read by a faster path), the scan reads what json.loads reads.
    """
    counts = {"prompt_tokens": prompt, "completion_tokens": completion}
    counts["total_tokens"] = total
    usage: dict = {key: counts[key] for key in order}
    usage["prompt_tokens_details"] = {"cached_tokens": 0}
    document = {
        "model": model,
        "choices": [{"message": {"content": content}}],
        "usage": usage,
    }
    found = scan(json.dumps(document, indent=indent).encode())
    assert found == Usage(model, prompt, completion, total)


def test_model_name_long_once_escaped():
    """
    A model name of control and astral characters, which JSON escapes to
    several times its length (found by the property above), is read.
    """
    model = "0" * 11 + "\x1f" * 13 + "\x07" * 3 + "\U00010000" * 11
    document = json.dumps(
        {"model": model, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    ).encode()
    assert len(document) > 300
    assert scan(document) == Usage(model, 1, 2, 3)
