"""The API's pure parts without a network: stop strings over pieces, chat templates against transformers,
request validation, node choice from gating loads, and settings that refuse an open bind without a key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.api.chat import ChatTemplate, TemplateError
from services.api.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from services.api.routing import least_loaded, parse_loads
from services.api.settings import ApiSettings
from services.api.stops import StopMatcher
from shared.schemas import GatingLoad

REPO = Path(__file__).resolve().parents[2]


def run_stops(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces)
    return out + matcher.flush(), matcher.stopped


def test_a_stop_string_split_over_pieces_is_cut_and_never_emitted() -> None:
    matcher = StopMatcher(["\n\n", "END"])
    assert matcher.push("abc E") == "abc "  # "E" may start "END": held back
    assert matcher.push("N") == ""
    assert matcher.push("D tail") == ""
    assert matcher.stopped
    assert run_stops(["a\n", "b"], ["\n\n"]) == ("a\nb", False)  # a held prefix that did not complete
    assert run_stops(["x", "yEN", "Dz"], ["END", "yE"]) == ("x", True)  # the earliest stop wins


@given(st.lists(st.text(alphabet="abc", max_size=4), max_size=8), st.lists(st.text(alphabet="abc", min_size=1,
                                                                                   max_size=3), min_size=1, max_size=3))
def test_stops_cut_at_the_first_occurrence_however_the_text_is_split(pieces: list[str], stops: list[str]) -> None:
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert run_stops(pieces, stops) == ((text[: min(hits)], True) if hits else (text, False))


def test_chat_templates_render_as_transformers_renders_them(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    source = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
              "{{ raise_exception('bad role') }}{% endif %}{% if loop.index0 > 5 %}{% break %}{% endif %}"
              "<|{{ m['role'] }}|>\n  {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}{{ messages | tojson }}")
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "héllo"}]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(REPO / "models" / "demo" / "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = source
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    for generation in (True, False):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert ours.render(messages, add_generation_prompt=generation) == want
    with pytest.raises(TemplateError, match="bad role"):
        ours.render([{"role": "tool", "content": "x"}])
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_the_demo_model_ships_a_chat_template() -> None:
    template = ChatTemplate.from_dir(REPO / "models" / "demo")
    assert template is not None
    assert template.render([{"role": "user", "content": "Hi"}]) == "### User:\nHi\n\n### Assistant:\n"


def test_requests_accept_neutral_values_and_refuse_what_prism_cannot_honour() -> None:
    ok = CompletionRequest.model_validate({"model": "m", "prompt": ["x"], "n": 1, "presence_penalty": 0.0,
                                           "temperature": None, "logprobs": None, "user": "u"})
    assert (ok.prompt_input(), ok.temperature) == ("x", 1.0)
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2]]}).prompt_input() == [1, 2]
    for bad in ({"prompt": "x", "frequency_penalty": 0.5}, {"prompt": "x", "stop": [""]},
                {"prompt": "x", "stop": ["a"] * 5}, {"prompt": "x", "stream_options": {"include_usage": True}},
                {"prompt": ""}, {"prompt": [[1], [2]]}, {"prompt": "x", "seed": -1}, {"prompt": "x", "top_p": 0}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", **bad})
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5})
    assert (chat.messages[0].text(), chat.token_limit()) == ("ab", 5)
    with pytest.raises(ApiError) as caught:
        parse_body(b"[1]", CompletionRequest)
    assert (caught.value.status, caught.value.code) == (400, "invalid_request")


def test_gating_errors_map_to_openai_statuses() -> None:
    statuses = {code: ApiError.from_gating(code, "m", 2).status for code in (
        "invalid_request", "prompt_too_long", "token_out_of_range", "overloaded", "expert_unavailable",
        "route_unavailable", "shutting_down", "internal")}
    assert statuses == {"invalid_request": 400, "prompt_too_long": 400, "token_out_of_range": 400, "overloaded": 429,
                        "expert_unavailable": 503, "route_unavailable": 503, "shutting_down": 503, "internal": 500}
    assert ApiError.from_gating("overloaded", "m", 2).headers == {"Retry-After": "2"}
    assert ApiError.from_gating("expert_unavailable", "m", 2).body()["error"]["type"] == "server_error"


def stats(node: str, active: int, waiting: int, max_batch: int = 4) -> dict[str, object]:
    load = GatingLoad(node=node, active=active, waiting=waiting, max_batch=max_batch, cancelled=0)
    return {"name": "prism-gating", "endpoints": [{"name": "cancel", "data": {"load": load.model_dump()}}]}


def test_the_least_loaded_node_counts_slots_queue_and_what_was_just_sent() -> None:
    loads = parse_loads([stats("a", 2, 0), stats("b", 1, 0), stats("b", 0, 0), {"endpoints": [{"data": None}]}])
    assert loads["b"].max_batch == 8  # two gatings of one node add up
    assert least_loaded(loads, {}) == "b"
    assert least_loaded(loads, {"b": 4}) == "a"  # (1 + 4) / 8 > 2 / 4
    assert least_loaded(parse_loads([stats("z", 0, 0), stats("y", 0, 0)]), {}) == "y"
    assert least_loaded({}, {}) is None


def test_an_open_bind_without_a_key_is_refused() -> None:
    assert ApiSettings(host="127.0.0.2").key is None
    with pytest.raises(ValidationError, match="not loopback"):
        ApiSettings(host="0.0.0.0")
    assert ApiSettings(host="0.0.0.0", key="x" * 16).key is not None
    result = subprocess.run([sys.executable, "-m", "services.api", "--host", "0.0.0.0"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("api: error:")
    assert "PRISM_API_KEY" in result.stderr
