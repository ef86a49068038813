"""Patch info mining and HD assembly against a PyTorch transcription of the original's
`encode_images` + `unified_resampler` (tensor layout NCHW, the original's reshapes and permutes),
with random weights, for grid 1 and HD (2x2 tiles + global). Tolerance: 1e-5 x output scale."""

import flax.linen as nn
import jax.numpy as jnp
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from mgjax.mining import MLPProjector, UniProjector, visual_tokens

C, CA, H = 16, 24, 32  # CLIP width, aux channels, LLM width
P, M = 4, 8  # CLIP grid and window side: stage-0 map side = P * M per view


def _uni(in_dim):
    seq = torch.nn.Sequential(torch.nn.LayerNorm(in_dim), torch.nn.Linear(in_dim, C))
    with torch.no_grad():
        seq[0].weight.add_(0.1 * torch.randn(in_dim))
        seq[0].bias.add_(0.1 * torch.randn(in_dim))
    return seq


def reference(images_feats, aux, grid, use_global, q, k, v, proj):
    """The original's encode_images after the towers. images_feats: CLIP output of the batch in the
    original's order [all tiles (b-major), then all globals]; aux: [B, Ca, Hs, Ws]."""

    def resampler(images, images_aux):
        patch_num = int(images.shape[1] ** 0.5)
        patch_size = images_aux.shape[-1] // patch_num
        images_aux = images_aux.permute(0, 2, 3, 1)
        images_aux = images_aux.reshape(len(images_aux), patch_num, patch_size, patch_num, patch_size,
                                        images_aux.shape[-1])
        images_aux = images_aux.permute(0, 1, 3, 2, 4, 5)
        images_aux = images_aux.reshape(len(images_aux), patch_num**2, patch_size**2, images_aux.shape[-1])
        eq, ea, ev = q(images), k(images_aux), v(images_aux)
        att = eq[:, :, None] @ (ea.transpose(-1, -2) / (ea.shape[-1] ** 0.5))
        return images, (att.nan_to_num().softmax(-1) @ ev).mean(2)

    b = aux.shape[0]
    feats = images_feats
    if use_global:
        feat_global = feats[-b:]
        feats = feats[:-b]
        aux_global = F.interpolate(aux.float(), scale_factor=1 / grid, mode="bilinear", align_corners=False)
        feat_global, aux_feat_global = resampler(feat_global, aux_global)
    if grid > 1:
        aux = aux.reshape(*aux.shape[:2], grid, aux.shape[-2] // grid, grid, aux.shape[-1] // grid)
        aux = aux.permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(0, 1)
    feats, aux_feats = resampler(feats, aux)
    if grid > 1:
        feats = feats.reshape(b, grid**2, *feats.shape[1:]).flatten(1, 2)
        aux_feats = aux_feats.reshape(b, grid**2, *aux_feats.shape[1:]).flatten(1, 2)
    if use_global:
        feats = torch.cat([feat_global, feats], dim=1)
        aux_feats = torch.cat([aux_feat_global, aux_feats], dim=1)
    return proj(feats + aux_feats)


class Head(nn.Module):
    grid: int
    use_global: bool

    @nn.compact
    def __call__(self, feats, aux_map):
        q = UniProjector(C, ("vis_embed", "vis_mlp"), name="vlm_uni_query_projector")
        k = UniProjector(C, ("conv_out", "vis_embed"), name="vlm_uni_aux_projector")
        v = UniProjector(C, ("conv_out", "vis_embed"), name="vlm_uni_val_projector")
        return MLPProjector(H, name="mm_projector")(visual_tokens(feats, aux_map, self.grid, self.use_global, q, k, v))


def _t(x):
    return jnp.asarray(x.detach().numpy())


def _params(q, k, v, proj):
    t = _t

    def uni(s):
        return {"0": {"scale": t(s[0].weight), "bias": t(s[0].bias)},
                "1": {"kernel": t(s[1].weight).T, "bias": t(s[1].bias)}}

    return {"vlm_uni_query_projector": uni(q), "vlm_uni_aux_projector": uni(k), "vlm_uni_val_projector": uni(v),
            "mm_projector": {"0": {"kernel": t(proj[0].weight).T, "bias": t(proj[0].bias)},
                             "2": {"kernel": t(proj[2].weight).T, "bias": t(proj[2].bias)}}}


@pytest.mark.parametrize("grid,use_global", [(1, False), (2, True), (2, False)])
def test_visual_tokens_match_original(grid, use_global):
    torch.manual_seed(grid + use_global)
    b = 2
    q, k, v = _uni(C), _uni(CA), _uni(CA)
    proj = torch.nn.Sequential(torch.nn.Linear(C, H), torch.nn.GELU(), torch.nn.Linear(H, H))
    views = grid * grid + int(use_global) if grid > 1 else 1
    feats = torch.randn(b, views, P * P, C)  # ours: per image, views [tiles..., global]
    aux = torch.randn(b, CA, grid * P * M, grid * P * M)
    # The original's CLIP batch: every image's tiles first, then every image's global view.
    tiles = feats[:, :grid * grid].flatten(0, 1)
    batch = torch.cat([tiles, feats[:, -1]]) if use_global else tiles
    with torch.no_grad():
        want = reference(batch, aux, grid, use_global, q, k, v, proj).numpy()
    got = Head(grid, use_global).apply({"params": _params(q, k, v, proj)}, jnp.asarray(feats.numpy()),
                                       jnp.asarray(aux.permute(0, 2, 3, 1).numpy()))
    assert got.shape == (b, views * P * P, H)
    assert_close(got, want, 1e-5, f"grid {grid} global {use_global}")
