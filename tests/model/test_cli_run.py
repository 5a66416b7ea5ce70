"""`prism run`: JSON on stdout, one-line errors on stderr.

Two tests start the real console script; the rest call the same handler in-process (each
subprocess pays a few seconds of torch import on a shared 2-core machine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.model.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def prism(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("prism")
    command = [str(script)] if script.is_file() else [sys.executable, "-c", "from cli.main import main; main()"]
    return subprocess.run(
        [*command, "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `prism run ARGS` called in this process."""
    from cli.main import build_parser

    capsys.readouterr()
    parsed = build_parser().parse_args(["run", *args])
    code = parsed.func(parsed)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = in_process(capsys, *args, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_greedy_json_matches_transformers(tiny_dir: Callable[..., Path], hf_model: Any) -> None:
    path = tiny_dir("qwen2_moe")
    prompt = [5, 17, 99, 3, 250, 41, 8, 77, 120]
    done = prism("--model", str(path), "--input-ids", ",".join(map(str, prompt)), "--max-tokens", "12", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    with torch.no_grad():
        ref = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    assert out["token_ids"] == ref.tolist()
    assert out["prompt_ids"] == prompt
    assert out["text"] == Tokenizer.from_dir(path).decode(out["token_ids"])
    assert out["usage"] == {"prompt_tokens": 9, "completion_tokens": len(out["token_ids"])}
    assert out["finish_reason"] == ("stop" if out["token_ids"][-1] == 2 else "length")


def test_prompt_text_sampling_and_plain_output(
    tiny_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tiny_dir("olmoe"))
    args = ("--model", path, "--prompt", "Hello, world!", "--max-tokens", "8", "--temperature", "0.9",
            "--top-p", "0.95", "--seed", "11", "--ignore-eos")
    first, second = run_json(capsys, *args), run_json(capsys, *args)
    assert first["prompt_ids"] == Tokenizer.from_dir(path).encode("Hello, world!")
    assert first["token_ids"] == second["token_ids"]
    assert len(first["token_ids"]) == 8
    assert first["finish_reason"] == "length"
    other = run_json(capsys, *args[:-2], "12", "--ignore-eos")
    assert other["token_ids"] != first["token_ids"]
    code, out, _ = in_process(capsys, *args)
    assert code == 0
    assert out == first["text"] + "\n"


def test_ids_without_tokenizer_and_bf16(
    tiny_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_dir("mixtral"), path)
    (path / "tokenizer.json").unlink()
    out = run_json(capsys, "--model", str(path), "--input-ids", "1, 2,3", "--max-tokens", "3", "--dtype", "bf16")
    assert out["text"] is None
    assert 1 <= len(out["token_ids"]) <= 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "/does/not/exist", "--input-ids", "1"), "does not exist"),
        (("--input-ids", "1,x"), "comma-separated integers"),
        (("--input-ids", "1,999"), r"token ids \[999\] outside the vocabulary"),
        (("--prompt", "hi", "--input-ids", "1"), "exactly one of --prompt"),
        (("--input-ids", "1", "--max-tokens", "0"), "--max-tokens must be >= 1"),
        (("--input-ids", "1", "--top-p", "0"), "top_p must be in"),
        (("--model", "UNSUPPORTED", "--input-ids", "1"), "unsupported model_type 'llama'"),
    ],
)
def test_errors_are_one_line(
    args: tuple[str, ...], message: str, tiny_dir: Callable[..., Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tiny_dir("mixtral")
    if "UNSUPPORTED" in args:
        bad = tmp_path / "llama"
        shutil.copytree(path, bad)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
        args = tuple(str(bad) if a == "UNSUPPORTED" else a for a in args)
    if "--model" not in args:
        args = ("--model", str(path), *args)
    code, out, err = in_process(capsys, *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prism run: error: ")
    assert re.search(message, lines[0]), lines[0]


def test_console_script_error_exit_code() -> None:
    done = prism("--model", "/does/not/exist", "--input-ids", "1")
    assert done.returncode == 2
    assert done.stderr == "prism run: error: checkpoint directory /does/not/exist does not exist\n"


def test_dtype_auto_follows_the_checkpoint_like_transformers(
    tiny_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    path = tmp_path / "bf16"
    shutil.copytree(tiny_dir("qwen3_moe"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    prompt = [5, 17, 99, 3, 250, 41, 8, 77]
    auto = run_json(capsys, "--model", str(path), "--input-ids", ",".join(map(str, prompt)), "--max-tokens", "10")
    bf16 = run_json(capsys, "--model", str(path), "--input-ids", ",".join(map(str, prompt)), "--max-tokens", "10",
                    "--dtype", "bf16")
    assert auto["token_ids"] == bf16["token_ids"]
    hf: Any = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # transformers' default: auto
    assert next(hf.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):]
    assert auto["token_ids"] == ref.tolist()


def test_generation_stops_at_the_models_context_as_a_gating_does(
    tiny_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "short"
    shutil.copytree(tiny_dir("mixtral"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    out = run_json(capsys, "--model", str(path), "--input-ids", "1,2,3", "--max-tokens", "20", "--ignore-eos")
    assert (len(out["token_ids"]), out["finish_reason"]) == (5, "length")  # 3 + 5 = the 8 positions
    code, _, err = in_process(capsys, "--model", str(path), "--input-ids", "1,2,3,4,5,6,7,8")
    assert code == 2
    assert err.strip() == "prism run: error: the prompt has 8 tokens; the model's context is 8"
