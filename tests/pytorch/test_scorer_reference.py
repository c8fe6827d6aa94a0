"""The scorer against an independent, naive computation of the DSD score.

The reference below shares no scoring code with dsdkit: it loads the components with diffusers/transformers
directly, tokenizes with transformers' CLIPTokenizer, preprocesses with plain PIL/numpy, noises with diffusers'
DDPMScheduler, runs the UNet with its *default* attention processors, captures each scored cross-attention's
inputs with plain forward hooks, recomputes Q and K from the layer's own to_q/to_k in float64, and pools with
explicit loops. Head weights for the paper preset come from autograd (Eq. 7 as written), not the closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dsdkit.runtime.config import ScoringConfig

from dsdkit.pytorch.scorer import Scorer

CAPTIONS = ["a red circle", "two blue squares on a table"]


def reference_timesteps_discffusion(num_steps: int) -> list[int]:
    # Written the way the authors' pipeline computes it (strength 0.8 of 50 steps -> t_start 10).
    t_start = 50 - int(50 * 0.8)
    rate = int(1000 / num_steps)
    indices = list(range(t_start, 990, rate))
    return list(reversed([999 - i for i in indices]))


def reference_setup(folder, images, captions, resolution):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    pixels = []
    for image in images:
        resized = image.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        pixels.append(np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0 * 2.0 - 1.0)
    with torch.no_grad():
        z0 = vae.encode(torch.from_numpy(np.stack(pixels))).latent_dist.mean * vae.config.scaling_factor
        batch = tokenizer(
            list(captions) + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        states = text_encoder(input_ids=batch.input_ids).last_hidden_state
    lengths = batch.attention_mask.sum(dim=1).tolist()  # BOS + words + EOS
    return unet, z0, states, lengths, scheduler


def kept_positions(length: int, tokens: str) -> list[int]:
    eos = length - 1
    if tokens == "all":
        return list(range(77))
    if tokens == "words-eos":
        return list(range(1, eos + 1))
    return list(range(1, eos))


def lse(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.sum(np.exp(values - top))))


def naive_layer_score(q: np.ndarray, k: np.ndarray, heads: int, kept: list[int], config: ScoringConfig) -> float:
    """q [n, H*d], k [77, H*d] float64 -> the layer's pooled score with explicit loops."""
    lam = config.lse_lambda
    d = q.shape[1] // heads
    per_head, probs_per_head = [], []
    for h in range(heads):
        qh, kh = q[:, h * d : (h + 1) * d], k[:, h * d : (h + 1) * d]
        logits = qh @ kh.T / math.sqrt(d)
        if config.pooling.value == "text-lse":
            values = [lse(lam * logits[i, kept]) / lam for i in range(logits.shape[0])]
            per_head.append(sum(values) / len(values))
        else:
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            probs_per_head.append(probs)
            values = [lse(lam * probs[:, j]) / lam for j in kept]
            per_head.append(sum(values) / len(values))
    if config.heads.value == "uniform":
        return sum(per_head) / heads
    weights = autograd_head_weights(np.stack(probs_per_head), kept, lam)
    return float(sum(w * f for w, f in zip(weights, per_head, strict=True)))


def autograd_head_weights(probs: np.ndarray, kept: list[int], lam: float) -> np.ndarray:
    """Eq. 7 as written: Attr_h = P_h * df/dP_h with f = mean_h mean_j S_j(P_h); weights = normalised sums."""
    leaf = torch.tensor(probs, dtype=torch.float64, requires_grad=True)  # [H, n, T]
    per_token = torch.logsumexp(lam * leaf, dim=1) / lam  # [H, T]
    f = per_token[:, kept].mean(dim=1).mean()
    (grad,) = torch.autograd.grad(f, leaf)
    attribution = (leaf * grad).sum(dim=(1, 2)).detach().numpy()
    return attribution / attribution.sum()


def linear64(layer, inputs):
    bias = None if layer.bias is None else layer.bias.double()
    return torch.nn.functional.linear(inputs, layer.weight.double(), bias).detach()


def reference_scores(
    folder, images, captions, config: ScoringConfig, resolution, layer_names, timesteps, noise_indices=None
):
    """Scores averaged over ``timesteps``; the k-th is noised with bank entry ``noise_indices[k]`` (default k)."""
    noise_indices = list(range(len(timesteps))) if noise_indices is None else list(noise_indices)
    unet, z0, states, lengths, scheduler = reference_setup(folder, images, captions, resolution)
    captured = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            captured[name] = (args[0].double(), kwargs["encoder_hidden_states"].double(), module)

        return fn

    handles = [unet.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in layer_names]
    generator = torch.Generator().manual_seed(config.noise_seed)
    bank = [torch.randn(z0.shape[1:], generator=generator) for _ in range(max(noise_indices) + 1)]
    empty = len(captions)
    scores = np.zeros((len(images), len(captions)))
    try:
        for i in range(len(images)):
            for j in range(len(captions)):
                total = 0.0
                for k, t in enumerate(timesteps):
                    noise = bank[noise_indices[k]][None]
                    x_t = scheduler.add_noise(z0[i : i + 1], noise, torch.tensor([t]))
                    terms = {}
                    for which in (j, empty):
                        with torch.no_grad():
                            out = unet(x_t, torch.tensor([t]), encoder_hidden_states=states[which : which + 1]).sample
                        layer_values = []
                        for name in layer_names:
                            hidden, context, module = captured[name]
                            q = linear64(module.to_q, hidden)[0].numpy()
                            kk = linear64(module.to_k, context)[0].numpy()
                            kept = kept_positions(lengths[which], config.tokens.value)
                            layer_values.append(naive_layer_score(q, kk, module.heads, kept, config))
                        if scheduler.config.prediction_type == "v_prediction":
                            # ε − ε̂ = sqrt(ā) (v − v̂), v the velocity target diffusers defines (SD2 768-v).
                            velocity = scheduler.get_velocity(z0[i : i + 1], noise, torch.tensor([t]))
                            error = float(scheduler.alphas_cumprod[t].sqrt() * (velocity - out).norm())
                        else:
                            error = float((noise - out).norm())
                        terms[which] = (sum(layer_values) / len(layer_values), error)
                    step = terms[j][0]
                    if config.denoise_term:
                        step += terms[empty][1] - terms[j][1]
                    total += step
                scores[i, j] = total / len(timesteps)
    finally:
        for handle in handles:
            handle.remove()
    return scores


@pytest.mark.parametrize("preset", ["discffusion", "paper"])
def test_scorer_equals_naive_reference(preset, tiny_model, tiny_model_dir, shape_images):
    overrides = {"num_timesteps": 2} if preset == "discffusion" else {"noise_levels": (0.3, 0.7)}
    config = ScoringConfig.from_preset(preset, **overrides)
    scorer = Scorer(tiny_model, config, batch_size=3)
    images = shape_images[:2]
    ours = scorer.score_matrix(images, CAPTIONS)
    if preset == "discffusion":
        assert scorer.timesteps == reference_timesteps_discffusion(2)
    expected = reference_scores(
        tiny_model_dir, images, CAPTIONS, config, scorer.resolution, scorer.layer_names, scorer.timesteps
    )
    np.testing.assert_allclose(ours.scores, expected, rtol=0, atol=1e-5)
    # The pairs must really differ, or agreement would prove little.
    assert np.ptp(expected) > 1e-4
    if preset == "paper":
        # Dynamic head weights must matter at this tolerance, or the check above could not catch a wrong weighting.
        uniform = Scorer(tiny_model, config.replace(heads="uniform")).score_matrix(images, CAPTIONS).scores
        assert np.abs(uniform - ours.scores).max() > 10 * 1e-5
