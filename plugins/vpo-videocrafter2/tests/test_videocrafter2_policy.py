"""The videocrafter2 policy on a tiny random VideoCrafter2 written as a Lightning-style model.ckpt with the original
key names, loaded by the same code a hub id takes.

Numerical parity with AILab-CVC/VideoCrafter's own UNet, VAE and DDIM sampler was checked while developing (see the
plugin's README); these tests pin the conventions (schedule, scale trick, CFG, seeds, windows, trajectories) with
formulas written here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from vpo_core import BuildContext, GradientWindow, TrajectorySettings, VpoError
from vpo_core.sampling import gaussian_log_prob
from vpo_videocrafter2 import build
from vpo_videocrafter2.checkpoint import TEXT, UNET, VAE, read_state_dict
from vpo_videocrafter2.testing import TEXT_BLOCKS, TEXT_WIDTH, build_tiny_videocrafter2, tiny_config
from vpo_videocrafter2.unet import LVDMUNet

torch.set_num_threads(1)
PROMPTS = ["a red cat", "two dogs playing", "a boat at night"]
CPU = BuildContext(device=torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_videocrafter2(tmp_path_factory.mktemp("vc2"))


@pytest.fixture(scope="module")
def policy(tiny):
    return build(tiny_config(tiny), CPU)


def assert_float_close(actual, expected, rel=1e-5):
    """Equal up to float32 rounding, relative to the tensor's scale (CFG 12 on a random model makes latents of ~50,
    and batches of other sizes take other kernels)."""
    assert (actual - expected).abs().max().item() <= rel * expected.abs().max().item() + 1e-6


def perturb_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ----------------------------------------------------------------------------------------------- loading
def test_loads_the_original_keys(policy, tiny):
    state = read_state_dict(tiny / "model.ckpt")
    unet = {k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)}
    assert set(unet) == {k.replace("base_layer.", "") for k in policy.unet.state_dict() if "lora_" not in k}
    assert any(".temopral_conv." in k for k in unet) and unet["init_attn.0.proj_in.weight"].dim() == 3  # Conv1d
    weight = policy.unet.input_blocks[1][0].temopral_conv.conv2[3].weight
    assert torch.equal(weight, unet["input_blocks.1.0.temopral_conv.conv2.3.weight"])
    assert torch.equal(policy.vae.decoder.conv_out.weight, state[VAE + "decoder.conv_out.weight"])
    assert policy.vae.config.scaling_factor == 0.18215 and list(policy.vae.config.block_out_channels) == [32, 64]
    # the penultimate layer: the text tower's last block is not part of the encoder
    assert policy.text_encoder.config.num_hidden_layers == TEXT_BLOCKS - 1
    assert policy.latent_shape == (4, 4, 8, 8)


def _open_clip_penultimate(state, ids):
    """open_clip's text tower (causal mask, pre-norm blocks) up to its penultimate block, then ln_final."""
    sd = {k[len(TEXT):]: v for k, v in state.items() if k.startswith(TEXT)}
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(TEXT_BLOCKS - 1):
        p = f"transformer.resblocks.{i}."
        y = F.layer_norm(x, (TEXT_WIDTH,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]).transpose(0, 1)
        attn, _ = F.multi_head_attention_forward(
            y, y, y, TEXT_WIDTH, 1, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask)
        x = x + attn.transpose(0, 1)
        y = F.layer_norm(x, (TEXT_WIDTH,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (TEXT_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"])


def test_text_is_the_penultimate_open_clip_layer_on_zero_padded_tokens(policy, tiny):
    tokens = policy.tokenizer(PROMPTS[:2], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = tokens.input_ids * tokens.attention_mask  # open_clip.tokenize: [sot] text [eot] 0 0 ...
    assert ids[0, 0] == policy.tokenizer.bos_token_id and ids[0, -1] == 0
    expected = _open_clip_penultimate(read_state_dict(tiny / "model.ckpt"), ids)
    torch.testing.assert_close(policy.embed_prompts(PROMPTS[:2]), expected, atol=2e-5, rtol=1e-4)


def test_hub_id_takes_the_same_path(tiny, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    asked = []

    def fake_download(repo_id, filename, revision=None):
        asked.append((repo_id, filename))
        if filename == "model.safetensors":
            raise EntryNotFoundError("no such file")
        return str(tiny / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = build(tiny_config(tiny, model="VideoCrafter/VideoCrafter2"), CPU)
    assert asked == [("VideoCrafter/VideoCrafter2", "model.safetensors"), ("VideoCrafter/VideoCrafter2", "model.ckpt")]
    assert hub.latent_shape == (4, 4, 8, 8)


def test_pickled_checkpoint_is_refused_unless_allowed(tmp_path):
    directory = build_tiny_videocrafter2(tmp_path / "pickled", needs_pickle=True)
    with pytest.raises(VpoError, match=r"safety\.allow_pickle.*|.*argparse\.Namespace") as error:
        build(tiny_config(directory), CPU)
    assert "safety.allow_pickle" in str(error.value) and "vpo videocrafter2 convert" in str(error.value)
    allowed = build(tiny_config(directory), BuildContext(device=torch.device("cpu"), seed=0, allow_pickle=True))
    assert allowed.latent_shape == (4, 4, 8, 8)


def test_convert_command_writes_safetensors_that_load_without_pickle(tmp_path, policy, capsys):
    from vpo_core.cli import main

    directory = build_tiny_videocrafter2(tmp_path / "pickled", needs_pickle=True)
    assert main(["videocrafter2", "convert", str(directory / "model.ckpt"), str(tmp_path / "out")]) != 0
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["videocrafter2", "convert", str(directory / "model.ckpt"), str(tmp_path / "out"),
                 "--allow-pickle"]) == 0
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == {k for k in read_state_dict(directory / "model.ckpt", allow_pickle=True)
                            if k.startswith((UNET, VAE, TEXT))}
    converted = build(tiny_config(tmp_path / "out", tokenizer=str(directory / "tokenizer")), CPU)
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():  # the same weights as the tiny model (seed 0)
        a = converted._eps(x, t, converted.embed_prompts(PROMPTS[:1]), 28, 12.0)
        b = policy._eps(x, t, policy.embed_prompts(PROMPTS[:1]), 28, 12.0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mismatched_checkpoint_gets_one_message(tmp_path, tiny):
    state = torch.load(tiny / "model.ckpt", weights_only=True)["state_dict"]
    state.pop(UNET + "out.2.bias")
    state[UNET + "input_blocks.1.0.emb_layers.1.bias"] = torch.zeros(7)
    state[UNET + "extra.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    torch.save({"state_dict": state}, tmp_path / "bad" / "model.ckpt")
    with pytest.raises(VpoError) as error:
        build(tiny_config(tmp_path / "bad", tokenizer=str(tiny / "tokenizer")), CPU)
    message = str(error.value)
    assert "1 missing" in message and "out.2.bias" in message and "1 unexpected" in message
    assert "1 mis-shaped" in message and "(7,)" in message
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith(TEXT)}},
               tmp_path / "bad" / "model.ckpt")
    with pytest.raises(VpoError, match=r"not a VideoCrafter2 checkpoint: no cond_stage_model\.model\.\*"):
        build(tiny_config(tmp_path / "bad", tokenizer=str(tiny / "tokenizer")), CPU)
    with pytest.raises(VpoError, match="does not exist"):
        build(tiny_config(tmp_path / "missing.ckpt"), CPU)


def test_sizes_must_fit_vae_and_unet(tiny):
    # the tiny model needs multiples of 4 (VAE x2, UNet x2); VideoCrafter2 of 64 (VAE x8, UNet x8)
    with pytest.raises(VpoError, match="multiples of 4"):
        build(tiny_config(tiny).model_copy(update={"height": 18}), CPU)


# ----------------------------------------------------------------------------------------------- sampling
def test_lvdm_schedule(policy):
    assert policy.timesteps.tolist() == [751, 501, 251, 1]
    assert policy.prev_timesteps.tolist() == [501, 251, 1, 0]
    s = policy.schedule
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert s.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)  # the last step's alpha_prev, not 1
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    assert s.scale[0] == 1 and s.scale[399] == pytest.approx(0.7)
    assert s.scale[200].item() == pytest.approx(1 - 0.3 * 200 / 399)
    assert (s.scale[400:] == s.scale[999]).all()
    assert len(policy.schedule.ddim_timesteps(30)[0]) == 31  # 1000 // 30 = 33: LVDM's uniform spacing
    with pytest.raises(ValueError, match="end at timestep 1000"):  # range(0, 1000, 333) + 1 ends at 1000
        tiny_config(".", num_inference_steps=3)


def test_ddim_step_with_the_scale_trick(policy):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 8, 8, generator=g)
    t, t_prev = torch.tensor([751, 251]), torch.tensor([501, 1])
    mean, std = policy._ddim(x, eps, t, t_prev, eta=0.6)
    for row in range(2):
        a, a_prev = policy.schedule.alphas_cumprod[t[row]], policy.schedule.alphas_cumprod[t_prev[row]]
        scale, scale_prev = policy.schedule.scale[t[row]], policy.schedule.scale[t_prev[row]]
        sigma = 0.6 * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        pred_x0 = (x[row] - (1 - a).sqrt() * eps[row]) / a.sqrt() / scale
        expected = a_prev.sqrt() * scale_prev * pred_x0 + (1 - a_prev - sigma**2).sqrt() * eps[row]
        torch.testing.assert_close(mean[row], expected, atol=1e-5, rtol=1e-5)
        assert std[row].item() == pytest.approx(sigma.item(), rel=1e-5)


def test_guidance_uses_the_empty_prompt_and_fps(policy):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 8, 8, generator=g)
    t = torch.tensor([600, 30])
    text, empty = policy.embed_prompts(PROMPTS[:2]), policy.embed_prompts([""]).expand(2, -1, -1)
    with torch.no_grad():
        guided = policy._eps(x, t, text, fps=28, guidance=12.0)

        def unet(context, fps):
            return policy.unet(x.transpose(1, 2), t, context, torch.full_like(t, fps)).transpose(1, 2)

        expected = unet(empty, 28) + 12.0 * (unet(text, 28) - unet(empty, 28))
        torch.testing.assert_close(guided, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(unet(text, 28), unet(text, 8))  # the fps embedding is used


def test_rows_are_reproducible_from_their_seeds_in_any_batch(policy):
    batch = policy.sample(PROMPTS, [11, 12, 13])
    alone = policy.sample(PROMPTS[1:2], [12])
    assert_float_close(batch.latents[1:2], alone.latents)
    assert_float_close(batch.frames[1:2], alone.frames)
    assert batch.frames.shape == (3, 4, 3, 16, 16) and 0 <= batch.frames.min() and batch.frames.max() <= 1
    again = policy.sample(PROMPTS[:1], [11])
    assert_float_close(batch.latents[:1], again.latents)
    other = policy.sample(PROMPTS[:1], [99])
    assert not torch.allclose(other.latents, again.latents)
    with pytest.raises(VpoError, match="one seed per row"):
        policy.sample(PROMPTS, [1])


def test_gradient_window_reaches_only_the_lora_weights_in_the_last_steps(policy):
    calls = []
    hook = policy.unet.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    policy.train(True)  # as in the loop: sampled in eval mode, back-propagated in train mode (dropout 0.1)
    try:
        rollout = policy.sample(PROMPTS[:1], [3], gradient=GradientWindow(last_steps=2, checkpointing=True))
    finally:
        hook.remove()
    assert calls == [False, False, True, True]  # one batched call (CFG) per step
    assert rollout.frames is None and rollout.latents.requires_grad and rollout.extras["grad_steps"] == 2
    frames = policy.decode(rollout.latents, [2])
    assert frames.shape == (1, 1, 3, 16, 16)
    frames.mean().backward()
    trainable = set(map(id, policy.trainable_parameters()))
    assert any(p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    assert all(p.grad is None for p in policy.unet.parameters() if id(p) not in trainable)
    assert all(p.grad is None for p in policy.vae.parameters())
    for p in policy.trainable_parameters():
        p.grad = None
    policy.train(False)
    window = GradientWindow(last_steps=3, random_cutoff=True)
    drawn = [policy._window_steps(window, [seed, seed + 1]) for seed in range(20)]
    assert set(drawn) == {1, 2, 3} and drawn == [policy._window_steps(window, [s, s + 1]) for s in range(20)]


def test_decode_selected_frames_and_encode(policy):
    latents = policy.sample(PROMPTS[:2], [1, 2], decode=False).latents
    full = policy.decode(latents)
    torch.testing.assert_close(policy.decode(latents, [3, 0]), full[:, [3, 0]])  # the VAE is 2D: frame j is frame j
    frames = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    encoded = policy.encode(frames)
    assert encoded.shape == (2, 4, 4, 8, 8) and encoded.dtype == torch.float32
    posterior = policy.vae.encode(frames[1, 2:3] * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(encoded[1, 2:3], posterior, atol=1e-5, rtol=1e-5)


def test_denoising_loss_is_lvdm_eps_loss_with_the_scale_trick(policy):
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    policy.train(False)
    loss = policy.denoising_loss(x0, PROMPTS[:2], t, noise)
    a, scale = policy.schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1), policy.schedule.scale[t].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * scale * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        eps = policy.unet(noisy.transpose(1, 2), t, policy.embed_prompts(PROMPTS[:2]), torch.full_like(t, 28))
    expected = (eps.transpose(1, 2) - noise).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    drawn = policy.sample_timesteps(500, torch.Generator().manual_seed(0))
    assert drawn.min() >= 0 and drawn.max() < 1000 and drawn.dtype == torch.long


# ----------------------------------------------------------------------------------------------- reference, saving
def test_reference_is_the_base_until_updated(tiny):
    policy = build(tiny_config(tiny), CPU)
    x0, noise = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 4, 8, 8)
    t = torch.tensor([300])
    policy.train(False)

    def loss():
        with torch.no_grad():
            return policy.denoising_loss(x0, PROMPTS[:1], t, noise)

    base = loss()
    perturb_lora(policy)
    tuned = loss()
    with policy.use_reference():
        torch.testing.assert_close(loss(), base)
    assert not torch.allclose(tuned, base)
    policy.update_reference()
    with policy.use_reference():
        torch.testing.assert_close(loss(), tuned)
    state = policy.state_dict_for_checkpoint()
    fresh = build(tiny_config(tiny), CPU)
    fresh.load_state_dict_from_checkpoint(state)
    fresh.train(False)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoising_loss(x0, PROMPTS[:1], t, noise), tuned)


def test_save_pretrained_lora_loads_with_peft(tiny, tmp_path):
    from peft import PeftModel

    policy = build(tiny_config(tiny), CPU)
    perturb_lora(policy, seed=3)
    policy.save_pretrained(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["to_k", "to_q", "to_v"] and config["r"] == 4
    base = build_unet_from(tiny)
    loaded = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    x, t, text = torch.randn(1, 4, 4, 8, 8), torch.tensor([400]), policy.embed_prompts(PROMPTS[:1])
    policy.train(False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text, torch.tensor([28])), policy.unet(x, t, text, torch.tensor([28])))


def build_unet_from(tiny) -> LVDMUNet:
    from vpo_videocrafter2.checkpoint import build_unet

    return build_unet(read_state_dict(tiny / "model.ckpt"), "tiny")


def test_full_finetune_saves_the_unet_under_its_original_names(tiny, tmp_path):
    policy = build(tiny_config(tiny, full_finetune=True), CPU)
    parameters = policy.trainable_parameters()
    assert len(parameters) == len(list(policy.unet.parameters())) and all(p.dtype == torch.float32 for p in parameters)
    with torch.no_grad():
        parameters[0].add_(1.0)
    policy.save_pretrained(tmp_path / "full")
    saved = load_file(tmp_path / "full" / "unet.safetensors")
    original = {k: v for k, v in read_state_dict(tiny / "model.ckpt").items() if k.startswith(UNET)}
    assert set(saved) == set(original)
    changed = [k for k in saved if not torch.equal(saved[k], original[k])]
    assert changed == [UNET + next(n for n, _ in policy.unet.named_parameters())]
    x0, noise, t = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 4, 8, 8), torch.tensor([50])
    policy.train(False)
    with torch.no_grad(), policy.use_reference():  # the reference is the frozen copy of the base
        reference = policy.denoising_loss(x0, PROMPTS[:1], t, noise)
    base = build(tiny_config(tiny), CPU).train(False)
    with torch.no_grad():
        torch.testing.assert_close(reference, base.denoising_loss(x0, PROMPTS[:1], t, noise))


# ----------------------------------------------------------------------------------------------- trajectories
def test_trajectory_full_window_is_sample_and_transitions_recompute_it(tiny):
    policy = build(tiny_config(tiny, eta=0.8), CPU)
    perturb_lora(policy, seed=4)
    trajectory = policy.sample_trajectory(PROMPTS, [5, 6, 7], TrajectorySettings(noise_level=0.8))
    assert trajectory.latents.shape == (3, 5, 4, 4, 8, 8) and trajectory.steps == [0, 1, 2, 3]
    assert trajectory.log_probs.dtype == torch.float32 and torch.isfinite(trajectory.log_probs).all()
    sampled = policy.sample(PROMPTS, [5, 6, 7])
    torch.testing.assert_close(trajectory.latents[:, -1], sampled.latents, atol=0, rtol=0)
    torch.testing.assert_close(trajectory.frames, sampled.frames)
    initial = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(6))  # row 1's own seed
    torch.testing.assert_close(trajectory.latents[1, 0], initial, atol=0, rtol=0)
    rows, steps = [0, 2, 1, 0], [0, 3, 2, 1]
    with torch.no_grad():
        transition = policy.transition(trajectory, rows, steps)
    torch.testing.assert_close(transition.log_prob, trajectory.log_probs[rows, steps], atol=1e-4, rtol=1e-6)
    # the recorded density is the Gaussian of LVDM's DDIM step with eta = noise level, computed here
    s, row, step = policy.schedule, 2, 3
    t, t_prev = policy.timesteps[step], policy.prev_timesteps[step]
    x = trajectory.latents[row, step]
    with torch.no_grad():
        eps = policy._eps(x[None], t[None], policy.embed_prompts([PROMPTS[row]]), 28, 12.0)[0]
    a, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[t_prev]
    std = 0.8 * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    pred_x0 = (x - (1 - a).sqrt() * eps) / a.sqrt() / s.scale[t] * s.scale[t_prev]
    mean = a_prev.sqrt() * pred_x0 + (1 - a_prev - std**2).sqrt() * eps
    nxt = trajectory.latents[row, step + 1]
    density = (-(nxt - mean) ** 2 / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).mean()
    assert trajectory.log_probs[row, step].item() == pytest.approx(density.item(), abs=1e-4)


def test_trajectory_rows_windows_and_transition_graph(tiny):
    policy = build(tiny_config(tiny, eta=0.0), CPU)
    perturb_lora(policy, seed=5)
    batch = policy.sample_trajectory(PROMPTS, [1, 2, 3], TrajectorySettings(noise_level=1.0, window=(1, 3)),
                                     decode=False)
    assert batch.steps == [1, 2] and batch.frames is None
    assert torch.isnan(batch.log_probs[:, [0, 3]]).all() and torch.isfinite(batch.log_probs[:, [1, 2]]).all()
    alone = policy.sample_trajectory(PROMPTS[2:], [3], TrajectorySettings(noise_level=1.0, window=(1, 3)),
                                     decode=False)
    assert_float_close(alone.latents[0], batch.latents[2])
    assert_float_close(alone.log_probs[0, 1:3], batch.log_probs[2, 1:3])
    deterministic = policy.sample_trajectory(PROMPTS, [1, 2, 3], TrajectorySettings(noise_level=1.0, window=(0, 0)),
                                             decode=False)
    assert deterministic.steps == [] and torch.isnan(deterministic.log_probs).all()
    sampled = policy.sample(PROMPTS, [1, 2, 3], decode=False)  # eta 0: LVDM's deterministic DDIM
    torch.testing.assert_close(deterministic.latents[:, -1], sampled.latents, atol=0, rtol=0)
    torch.testing.assert_close(batch.latents[:, 1], deterministic.latents[:, 1])  # step 0 is outside the window
    assert not torch.allclose(batch.latents[:, 2], deterministic.latents[:, 2])

    policy.train(True)  # transitions run without dropout whatever the mode
    transition = policy.transition(batch, [0, 1], [1, 2])
    torch.testing.assert_close(transition.log_prob.detach(), batch.log_probs[[0, 1], [1, 2]], atol=1e-4, rtol=1e-6)
    transition.log_prob.sum().backward()
    trainable = set(map(id, policy.trainable_parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    assert all(p.grad is None for p in policy.unet.parameters() if id(p) not in trainable)
    with torch.no_grad(), policy.use_reference():
        reference = policy.transition(batch, [0, 1], [1, 2])
    assert not torch.allclose(reference.log_prob, transition.log_prob.detach())
    assert gaussian_log_prob(batch.latents[[0], 2], transition.mean[:1].detach(), transition.std[:1]).item() == \
        pytest.approx(transition.log_prob[0].item(), abs=1e-5)


def test_lora_sits_on_exactly_the_target_modules(tiny):
    from vpo_core.testing import lora_placement

    for targets in (["to_v"], ["to_k", "proj_out"]):
        policy = build(tiny_config(tiny, lora={"rank": 2, "target_modules": targets}), CPU)
        adapted, matching = lora_placement(policy, targets)
        assert adapted and adapted == matching, targets
