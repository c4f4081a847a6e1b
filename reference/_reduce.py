import torch


def reduce_terms(terms: torch.Tensor, reduction: str, count) -> torch.Tensor:
    """`mean` sums every term and divides by `count` (N, or the number of valid anchors): the
    equations sum over branch pairs and average over samples. `sum` sums; `none` returns the terms."""
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count
    raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
