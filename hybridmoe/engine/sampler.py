"""Samplers are callables built by a factory: (logits [V] f32, history) -> token id."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .config import GenerationConfig

Sampler = Callable[[torch.Tensor, list[int]], int]


class NonFiniteLogits(Exception):
    """The model's logits hold NaN or infinity: there is no token to pick."""


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed tokens get -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.min_p > 0:
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(), float("-inf"))
    if cfg.top_p < 1:
        sorted_p, order = torch.sort(logits.softmax(-1), descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_sampler(cfg: GenerationConfig) -> Sampler:
    gen = torch.Generator()
    if cfg.seed is not None:
        gen.manual_seed(cfg.seed)
    else:
        gen.seed()

    def sample(logits: torch.Tensor, history: list[int]) -> int:
        logits = apply_repetition_penalty(logits.float(), history, cfg.repetition_penalty)
        if cfg.greedy:
            # argmax picks a NaN or +inf wherever there is one, so its value tells whether all are finite;
            # index and value come back in one host sync
            i = logits.argmax()
            value, token = torch.stack((logits[i].double(), i.double())).tolist()
            if not math.isfinite(value):
                raise NonFiniteLogits()
            return int(token)
        if not torch.isfinite(logits).all():  # host sync; multinomial would fail on NaN
            raise NonFiniteLogits()
        probs = filter_logits(logits, cfg).softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=gen))

    return sample
