"""Inputs shared by the parity tests."""

import torch


def padded_batch(seq_len: int, seed: int = 0):
    """3 rows of random ids: one unpadded, two left-padded; with the mask and matching position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 151_000, (3, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : seq_len // 3] = 0  # left padding
    mask[2, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids
