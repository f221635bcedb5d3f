"""The user's own adapters (PEFT LoRA, :mod:`rtlynx.integrations.peft`) in a site's LoRA tail.

The tail of a site's operand (:mod:`rtlynx.sites.operand`) has two segments, each padded to a multiple of 64 rows:
the compensation LoRA's rows (every member's, as without adapters), then the rows reserved for the user's adapters
(``R_i`` per member, :func:`room`)::

    lora_a = [A_c | 0 | s_a A_a, s_b A_b (member 1: its active adapters, zero-padded to R_1) | ... | 0]
    wext   = [W | 0 | B_c expanded | B_a, B_b expanded ...]   (member i's B in its own rows only)

so ``h = x lora_a^T`` and the GEMM's tail give ``sum_u scale_u (x A_u^T) B_u^T`` next to the compensation LoRA: one
tail of width r_comp + r_user, each adapter's scale folded into its A rows. A member's adapters come from its
*source*, the PEFT layer wrapping it (stored on the sparse layer, :data:`SOURCE`). Swapping, re-weighting, switching
adapters on and off only rewrites the reserved rows in place (:func:`fill`): the shapes stay, so a torch.compiled
model does not recompile.

A call reads the user rows ("full" tail) only when the source asks (``layer(x, user_tail=True)`` after
:func:`carries`), and PEFT then runs no GEMMs of its own for that layer. Every other call (dense mode, the reference
and cuSPARSELt layers, the speed rules' dense calls, a direct call of the sparse layer, PEFT's mixed-batch path)
reads the operand without them and PEFT adds the adapters itself.

A source provides ``tail_need() -> (has adapters, rank of the active ones that can ride, 0 if none)``,
``tail_factors() -> (A with the scales folded in [r, K], B [N, r]) or None``, ``tail_signature()`` (cheap, changes
with anything the factors depend on) and ``tail_requires_grad()``.
"""

from __future__ import annotations

import torch

from .. import backends

SOURCE = "_adapter_source"  # attribute of a SparseActLinear: the PEFT layer wrapping it (in __dict__: no submodule)


def source(layer):
    return layer.__dict__.get(SOURCE)


def attach(layer, src) -> None:
    """``src`` (the PEFT layer wrapping ``layer``) supplies its adapters; refills (or resizes) the member's rows."""
    layer.__dict__[SOURCE] = src
    refresh(layer)


def detach(layer) -> None:
    if layer.__dict__.pop(SOURCE, None) is not None:
        refresh(layer)


def room(site, current: tuple[int, ...]) -> list[int]:
    """The rows each member reserves for its adapters (``SparsityConfig.adapter_rank``; ``current``: what a site
    being rebuilt reserved so far, which "auto" never shrinks while adapters remain)."""
    out = []
    for i, layer in enumerate(site.layers):
        src = source(layer)
        cfg = layer._settings.config.adapter_rank
        has, need = src.tail_need() if src is not None else (False, 0)
        if not has or cfg == 0 or site.tp is not None:  # tensor-parallel sites keep PEFT's GEMMs
            out.append(0)
        elif cfg == "auto":
            out.append(max(current[i] if i < len(current) else 0, need))
        else:
            out.append(cfg)
    return out


def user_b(site, i: int) -> torch.Tensor:
    """Member ``i``'s user-adapter B ``[N_i, R_i]``: a view of the operand's tail (B's column t at Kp + 2t), or of
    the compact buffer of a site whose weights are stored in FP8 (no bf16 operand)."""
    u, r = site._uoffs[i] - site._rcp, site._uranks[i]
    if site.wext is not None:
        c = site.kp + 2 * site._uoffs[i]
        return site.wext[site.slices[i], c: c + 2 * r: 2]
    return site._user_b[site.slices[i], u: u + r]


def fill(site, slots=None) -> None:
    """Write the members' active adapters into their reserved rows, zeros where a member carries none; a member
    whose adapters sum to more than its rows carries none (PEFT runs them, with a warning)."""
    for i in range(len(site.layers)) if slots is None else slots:
        src = source(site.layers[i])
        r = site._uranks[i]
        site._carry[i] = site._user_grad[i] = False
        site._user_sig[i] = None if src is None else src.tail_signature()
        if not r or site.lora_a is None:
            continue
        rows, b_cols = site.lora_a[site._uoffs[i]: site._uoffs[i] + r], user_b(site, i)
        with torch.no_grad():
            f = src.tail_factors()
            rows.zero_()
            b_cols.zero_()
            if f is None:
                continue
            a, b = f
            if a.shape[0] > r:
                backends.warn_once(f"adapter-rank:{a.shape[0]}>{r}", (
                    f"rtlynx: adapters of rank {a.shape[0]} on one layer exceed adapter_rank={r}: they run as PEFT's "
                    f"own GEMMs after the sparse GEMM (slower); rtlynx.configure(model, adapter_rank={a.shape[0]}) "
                    "makes room in the LoRA tail"))
                continue
            rows[: a.shape[0]].copy_(a)
            b_cols[:, : a.shape[0]].copy_(b)
        site._carry[i] = True
        site._user_grad[i] = src.tail_requires_grad()
    site._pending = None  # outputs computed with the old rows


def refresh(layer) -> None:
    """After ``layer``'s adapters changed: its site is rebuilt if the member's room changes (a reallocation),
    otherwise its rows are refilled in place."""
    site, i = layer._site, layer._slot
    if room(site, site._uranks)[i] != site._uranks[i]:
        site.build()
    else:
        fill(site, [i])


def update(site, sources) -> None:
    """Set every member's source (``sources[i]``, None for none) and bring the tail up to date: rebuilt where a
    member's room changes, refilled in place otherwise."""
    for layer, src in zip(site.layers, sources):
        if src is None:
            layer.__dict__.pop(SOURCE, None)
        else:
            layer.__dict__[SOURCE] = src
    if room(site, site._uranks) != list(site._uranks):
        site.build()
    else:
        fill(site)


def sync(site, slots=None) -> None:
    """Eager check that the rows still hold the sources' adapters (an in-place edit of a factor, a state_dict load,
    train / eval): a few version counters per member; refilled if not."""
    for i in range(len(site.layers)) if slots is None else slots:
        src = source(site.layers[i])
        if src is not None and src.tail_signature() != site._user_sig[i]:
            refresh(site.layers[i])


def carries(site, layer, x2: torch.Tensor) -> bool:
    """Whether this call of ``layer`` on ``x2`` runs the site kernels with the layer's adapters in the tail (its
    source then skips PEFT's GEMMs and calls ``layer(x, user_tail=True)``)."""
    slot = layer._slot
    if not site._carry[slot] or layer.mode != "sparse":
        return False
    if layer._step_gate is not None and layer._step_gate.dense:
        return False
    if site._rcp and not layer.lora_enabled:  # the compensation rows lead the tail: it runs only with them on
        return False
    if torch.is_grad_enabled() and site._user_grad[slot]:  # gradients reach PEFT's parameters through its GEMMs
        return False
    cfg = layer._settings.config
    return site.k % cfg.m == 0 and site._fused_path(cfg, layer, x2) in ("fused", "checked")


def member_factors(site, layer, full: bool):
    """``(A, B)`` of the LoRA terms a call of ``layer`` adds (the compensation LoRA when on, and with ``full`` the
    user adapters' rows), for the per-layer path a fused call falls back to; ``(None, None)`` without any."""
    use = layer.lora_enabled and layer.lora_A is not None
    a, b = (layer.lora_A, layer.lora_B) if use else (None, None)
    i = layer._slot
    if not (full and site._carry[i]):
        return a, b
    ua = site.lora_a[site._uoffs[i]: site._uoffs[i] + site._uranks[i]]
    ub = user_b(site, i)
    if a is None:
        return ua, ub
    return torch.cat([a, ua]), torch.cat([b, ub], 1)


__all__ = ["SOURCE", "attach", "carries", "detach", "fill", "member_factors", "refresh", "room", "source", "sync",
           "update", "user_b"]
