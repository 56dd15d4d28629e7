"""A plain NumPy (float64) re-implementation of MSFlow's flows, written from the formulas, for the
golden-loss test: loops and explicit padding, no torch operators. It reads the modules' parameters as
data and recomputes everything else (positional encoding, couplings, clamps, fusion, NLL) itself.
"""

from __future__ import annotations

import math

import numpy as np


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """(C_in, H, W) -> (C_out, H, W), zero padding 1, cross-correlation as in every CNN library."""
    c_out, _, _, _ = weight.shape
    _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((c_out, h, w))
    for dy in range(3):
        for dx in range(3):
            patch = padded[:, dy : dy + h, dx : dx + w]  # (C_in, H, W)
            out += np.einsum("oi,ihw->ohw", weight[:, :, dy, dx], patch)
    return out + (0 if bias is None else bias[:, None, None])


def channel_layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=0, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=0, keepdims=True)  # biased, as layer norm defines it
    return (x - mean) / np.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def subnet(x: np.ndarray, p: dict[str, np.ndarray], eps: float, final_relu: bool = False) -> np.ndarray:
    """conv3x3 -> channel LayerNorm -> ReLU -> conv3x3 (-> ReLU for the fusion mixer)."""
    h = np.maximum(
        channel_layer_norm(conv3x3(x, p["0.weight"], p["0.bias"]), p["1.weight"], p["1.bias"], eps), 0
    )
    out = conv3x3(h, p["3.weight"], p["3.bias"])
    return np.maximum(out, 0) if final_relu else out


def positional_encoding(channels: int, height: int, width: int) -> np.ndarray:
    half = channels // 2
    enc = np.zeros((channels, height, width))
    for k in range(half // 2):
        w_k = 10000.0 ** (-2 * k / half)
        for x in range(width):
            enc[2 * k, :, x] = math.sin(w_k * x)
            enc[2 * k + 1, :, x] = math.cos(w_k * x)
        for y in range(height):
            enc[half + 2 * k, y, :] = math.sin(w_k * y)
            enc[half + 2 * k + 1, y, :] = math.cos(w_k * y)
    return enc


def coupling(x: np.ndarray, cond: np.ndarray, p: dict[str, np.ndarray], alpha: float, eps: float):
    """One affine coupling block on one image: returns (y, log_det)."""
    c = x.shape[0]
    passive, active = c - c // 2, c // 2
    sub = {k.removeprefix("subnet."): v for k, v in p.items() if k.startswith("subnet.")}
    a = 0.1 * subnet(np.concatenate([x[:passive], cond]), sub, eps)
    log_scale = alpha * np.tanh(a[:active])  # FrEIA 0.2's soft clamp
    y = np.concatenate([x[:passive], x[passive:] * np.exp(log_scale) + a[active:]])
    gamma = 0.1 * 2.0 * np.log1p(np.exp(0.5 * p["global_scale_raw"].reshape(-1)))  # 0.1 softplus_beta=0.5
    y = y * gamma[:, None, None] + p["global_offset"].reshape(-1)[:, None, None]
    y = y[p["perm"]]
    return y, log_scale.sum() + x.shape[1] * x.shape[2] * np.log(gamma).sum()


def fusion(zs: list[np.ndarray], p: dict[str, np.ndarray], alpha: float, eps: float):
    """The fusion flow on one image whose coarsest scale is 1 x 1 (so up-sampling is a broadcast)."""
    assert zs[-1].shape[1:] == (1, 1)
    zs = [z[p[f"permutations.{i}.perm"]] for i, z in enumerate(zs)]
    halves = [z.shape[0] // 2 for z in zs]
    us = [z[:h] for z, h in zip(zs, halves, strict=True)]
    vs = [z[h:] for z, h in zip(zs, halves, strict=True)]

    def soft_clamp(s: np.ndarray) -> np.ndarray:
        return alpha * 0.636 * np.arctan(s / alpha)

    def heads(name: str, inputs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        q = {k.removeprefix(name + "."): v for k, v in p.items() if k.startswith(name + ".")}
        pooled = np.concatenate([x.mean(axis=(1, 2), keepdims=True) for x in inputs])  # to 1 x 1
        mixed = subnet(pooled, {k.removeprefix("mixer."): v for k, v in q.items()}, eps, final_relu=True)
        out, start = [], 0
        for i, (x, h) in enumerate(zip(inputs, halves, strict=True)):
            r = x + mixed[start : start + h]  # broadcast of the 1 x 1 message
            start += h
            sigma = conv3x3(r, q[f"sigma_heads.{i}.weight"], q[f"sigma_heads.{i}.bias"])
            tau = conv3x3(r, q[f"tau_heads.{i}.weight"], q[f"tau_heads.{i}.bias"])
            out.append((sigma, tau))
        return out

    log_det = 0.0
    new_us = []
    for u, (sigma, tau) in zip(us, heads("subnet_v_to_u", vs), strict=True):
        new_us.append(np.exp(soft_clamp(sigma)) * u + tau)
        log_det += soft_clamp(sigma).sum()
    new_vs = []
    for v, (sigma, tau) in zip(vs, heads("subnet_u_to_v", new_us), strict=True):
        new_vs.append(np.exp(soft_clamp(sigma)) * v + tau)
        log_det += soft_clamp(sigma).sum()
    return [np.concatenate([u, v]) for u, v in zip(new_us, new_vs, strict=True)], log_det


def nll(zs: list[np.ndarray], log_det: float) -> float:
    """0.5 * sum of z^2 over every dimension, minus the log-det (no 2 pi constant)."""
    return 0.5 * sum(float((z**2).sum()) for z in zs) - log_det
