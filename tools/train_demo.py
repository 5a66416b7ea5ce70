"""Train the demo MoE (Mixtral family) or its dense twin on the demo corpus, seeded and reproducible.

``--variant moe``: Mixtral, 4 layers, hidden 192 (3 query heads, 1 key/value head), 32 routed
experts per layer (SwiGLU, intermediate 96), top-2, with a load-balancing auxiliary loss applied
per layer (`balance_loss`; transformers' own pools the layers), tied embeddings, 256-token context.
``--variant dense``: Mistral with the same attention and an MLP of intermediate 192, i.e. the MoE's
active size per token (two experts of 96), trained on the same batches.

Every step takes the same number of windows from each domain. One CPU thread, no dropout, a
batch that is a function of (seed, step): the same seed gives the same weights. The run writes
under ``--out``: ``log.jsonl`` (one line per logged step), ``init/`` (the weights at step 0, the
random-init baseline), ``state.pt`` (every ``--save-every`` steps, to resume after an interrupt)
and ``final/`` (the trained model in Hugging Face format, bf16, with its tokenizer).

Usage: ``python -m tools.train_demo --variant moe --steps 700 [--out var/train/moe]``
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tools.demo_data import EOS_ID, streams, train_batch

# Sized for compute, not parameters: on ~1/2 of a shared CPU core for ~25 minutes, a narrow model
# that sees more tokens reaches a lower loss than a wider one that sees fewer.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 192, 4, 3, 1, 64
EXPERTS, TOP_K, EXPERT_INTERMEDIATE = 32, 2, 96
VOCAB, SEQ_LEN = 4096, 256
AUX_COEF = 0.02  # weight of the per-layer balancing loss (see balance_loss)


def model_config(variant: str) -> Any:
    """The transformers config of a variant ("moe" or "dense")."""
    from transformers import MistralConfig, MixtralConfig

    common: dict[str, Any] = {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "max_position_embeddings": SEQ_LEN, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "bos_token_id": None, "eos_token_id": EOS_ID, "pad_token_id": None, "sliding_window": None,
        "initializer_range": 0.02,
    }
    if variant == "moe":
        return MixtralConfig(
            intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
            output_router_logits=True, router_aux_loss_coef=AUX_COEF, router_jitter_noise=0.0, **common,
        )
    if variant == "dense":
        return MistralConfig(intermediate_size=TOP_K * EXPERT_INTERMEDIATE, **common)
    raise ValueError(f"unknown variant {variant!r}; accepted: 'moe', 'dense'")


def build_model(variant: str, seed: int) -> Any:
    """A freshly initialised model of the variant, deterministic in seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        model_config(variant), dtype=torch.float32
    )


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# Markdown-like turns, close to the docs the model read; the HTTP API renders it (services/api/chat.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def save_hf(model: Any, directory: Path, tokenizer_file: Path) -> None:
    """Save in Hugging Face format as bf16 (per-expert names), with the tokenizer and its config."""
    training_flag = getattr(model.config, "output_router_logits", False)
    model.config.output_router_logits = False  # inference does not need the auxiliary loss
    model.to(torch.bfloat16).save_pretrained(directory)
    model.to(torch.float32)
    model.config.output_router_logits = training_flag
    shutil.copyfile(tokenizer_file, directory / "tokenizer.json")
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                  "model_max_length": SEQ_LEN, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss per MoE layer, averaged over layers (1.0 when balanced).

    router_logits: one [T, E] tensor per layer. Per layer: E · Σ_e f_e · P_e, with f_e the share of
    the T·K choices that went to e and P_e the mean router probability of e. transformers'
    `load_balancing_loss_func` pools all layers before multiplying, so expert e of one layer can
    offset expert e of another; trained with it, each layer sent ~75% of its tokens to a quarter of
    its experts. This form balances every layer by itself.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, K]
        share = torch.zeros_like(probs[0]).index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel()))
        share = share / chosen.numel()
        losses.append(probs.shape[-1] * torch.sum(share * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def train_step(model: Any, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float) -> dict[str, float]:
    """One AdamW step on batch [B, S]; returns the language-model loss and the balancing loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(input_ids=batch)
    logits = out.logits[:, :-1]  # [B, S-1, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    aux = torch.zeros(())
    if getattr(out, "router_logits", None):
        aux = balance_loss(tuple(out.router_logits), model.config.num_experts_per_tok)
    torch.autograd.backward(loss + AUX_COEF * aux)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "aux": float(aux.detach()), "grad_norm": float(norm)}


def make_optimizer(model: Any, peak: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), eps=1e-8)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = streams(args.corpus, args.tokenizer, "train")
    model = build_model(args.variant, args.seed)
    if not (out / "init").is_dir():
        save_hf(model, out / "init", args.tokenizer)
    optimizer = make_optimizer(model, args.lr)
    start = 0
    if (out / "state.pt").is_file():  # resume: weights, optimizer, step; batches depend on the step only
        state = torch.load(out / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    model.train()
    per_domain = args.batch // len(data)
    t0 = time.time()
    with (out / "log.jsonl").open("a") as log:
        for step in range(start, args.steps):
            batch = train_batch(data, args.seed, step, per_domain, SEQ_LEN)
            lr = learning_rate(step, args.steps, args.lr, args.warmup)
            stats = train_step(model, optimizer, batch, lr)
            if step % args.log_every == 0 or step == args.steps - 1:
                row = {"step": step, "lr": lr, "elapsed_s": round(time.time() - t0, 1), **stats}
                log.write(json.dumps(row) + "\n")
                log.flush()
            if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1},
                           out / "state.pt")
    save_hf(model, out / "final", args.tokenizer)
    (out / "state.pt").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("moe", "dense"), default="moe")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (a multiple of the domains)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--corpus", type=Path, default=Path("var/corpus"))
    parser.add_argument("--tokenizer", type=Path, default=Path("var/tokenizer.json"))
    parser.add_argument("--out", type=Path, default=None, help="default: var/train/<variant>")
    args = parser.parse_args(argv)
    args.out = args.out or Path("var/train") / args.variant
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
