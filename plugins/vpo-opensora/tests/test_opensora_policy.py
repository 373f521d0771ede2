"""The opensora policy on a tiny random Open-Sora v1.2 in the published layouts, loaded by the real loading code."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch
from vpo_core import BuildContext, GradientWindow, Policy, TrajectorySettings, VpoError
from vpo_core.sampling import gaussian_log_prob
from vpo_opensora import OpenSoraConfig, STDiT3, build, build_tiny_opensora
from vpo_opensora.stdit3 import STDiT3Config
from vpo_opensora.testing import tiny_config
from vpo_opensora.text import prepare_prompt

PROMPTS = ["a cat running", "a cat running", "a red car in the city", "a dog on the beach"]
SEEDS = [11, 12, 13, 14]
CPU = BuildContext(device=torch.device("cpu"), seed=0)
LATENT = (5, 4, 4, 4)  # 17 frames at 32x32: [T', C, h, w]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_opensora(tmp_path_factory.mktemp("opensora") / "tiny", seed=0)


def make_policy(directory, **overrides):
    return build(tiny_config(directory, **overrides), CPU)


def randomize_lora(policy, scale=0.5, seed=0):
    """Stand-in for training: LoRA B starts at zero, so give the adapter a visible effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def fixed_loss(policy, latents, prompts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    timesteps = policy.sample_timesteps(latents.shape[0], generator)
    noise = policy.sample_noise(latents, generator)
    with torch.no_grad():
        return policy.denoising_loss(latents, prompts, timesteps, noise)


def random_latents(rows, seed=5):
    return torch.randn(rows, *LATENT, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- parts
def test_plugin_registers_a_policy_that_trains_only_lora_on_attention_and_mlp(tiny):
    from vpo_opensora import plugin

    registered = {}
    plugin.vpo_register_policies(register=lambda name, factory, model: registered.update({name: (factory, model)}))
    factory, model = registered["opensora"]
    assert model is OpenSoraConfig and "trajectories" in OpenSoraConfig.capabilities
    policy = factory(tiny_config(tiny), CPU)
    assert isinstance(policy, Policy)
    assert not any(p.requires_grad for m in (policy.vae, policy.text_encoder) for p in m.parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert trainable and all(p.requires_grad == (id(p) in trainable) for p in policy.transformer.parameters())
    adapted = policy.trainable.adapted_module_names()
    for kind in ("spatial_blocks", "temporal_blocks"):
        for layer in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                      "mlp.fc1", "mlp.fc2"):
            assert f"{kind}.1.{layer}" in adapted
    assert not any(name.startswith(("x_embedder", "y_embedder", "t_block", "final_layer")) for name in adapted)


def test_timestep_transform_matches_open_sora_reference_values(tiny):
    # FACTS: 64x64, 17 frames, 4 steps -> [1000, 456.086, 218.450, 85.229]
    policy = make_policy(tiny, height=64, width=64, num_inference_steps=4)
    expected = torch.tensor([1000.0, 456.086, 218.450, 85.229])
    torch.testing.assert_close(policy.timesteps(), expected, atol=2e-3, rtol=0)
    # 51 frames weigh sqrt(15) instead of sqrt(5); one frame sqrt(1)
    assert make_policy(tiny, num_frames=51).timesteps()[1] > make_policy(tiny).timesteps()[1]
    assert make_policy(tiny, num_frames=1).timesteps()[1] < make_policy(tiny).timesteps()[1]


# ----------------------------------------------------------------------------------------------- sampling
def test_sampling_is_the_guided_euler_chain_of_open_sora(tiny):
    """A hand-written rectified-flow loop: noise = randn(C, T', h, w) from the seed, v = null + 7 (text - null)
    with the learned null caption, z += v (t_i - t_next) / 1000."""
    policy = make_policy(tiny)
    rollout = policy.sample(PROMPTS[2:3], SEEDS[2:3], decode=False)
    caption, mask = policy.embed_prompts(PROMPTS[2:3])
    z = torch.randn(4, 5, 4, 4, generator=torch.Generator().manual_seed(SEEDS[2]))[None]
    timesteps = policy.timesteps().tolist() + [0.0]
    size = dict(fps=torch.tensor([24.0]), height=torch.tensor([32.0]), width=torch.tensor([32.0]))
    with torch.no_grad():
        for t, after in zip(timesteps, timesteps[1:]):
            t = torch.tensor([t])
            text = policy.transformer(z, t, caption, mask, **size)[:, :4]
            null = policy.transformer(z, t, policy.transformer.y_embedder.y_embedding[None], mask, **size)[:, :4]
            z = z + (null + 7.0 * (text - null)) * ((t - after) / 1000)
    torch.testing.assert_close(rollout.latents, z.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)


def test_rows_are_reproducible_alone_and_in_any_micro_batch(tiny):
    batched = make_policy(tiny, micro_batch_size=3).sample(PROMPTS, SEEDS)
    assert batched.latents.shape == (4, *LATENT) and batched.frames.shape == (4, 17, 3, 32, 32)
    assert 0 <= batched.frames.min() and batched.frames.max() <= 1
    single = make_policy(tiny, micro_batch_size=1)
    for row in (0, 3):
        alone = single.sample([PROMPTS[row]], [SEEDS[row]])
        torch.testing.assert_close(batched.latents[row : row + 1], alone.latents, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.frames[row : row + 1], alone.frames, atol=1e-5, rtol=0)
    assert (batched.latents[0] - batched.latents[1]).abs().max() > 1e-2  # same prompt, different seeds


def test_prompts_get_the_release_suffix_and_cleaning_and_are_cached(tiny):
    assert prepare_prompt("A <b>Cat</b>  running!!", 6.5, None) == "a cat running!! aesthetic score: 6.5."
    assert prepare_prompt("a cat. aesthetic score: 5.0.", 6.5, 2.0) == "a cat. aesthetic score: 5.0. motion score: 2.0."
    policy = make_policy(tiny, text_cache_size=2)
    calls = []
    policy.text_encoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"]),
                                              with_kwargs=True)
    caption, mask = policy.embed_prompts(["a cat", "a dog", "a cat"])
    assert len(calls) == 1 and calls[0].shape == (2, 300) and caption.shape == (3, 300, 32)
    words = policy.tokenizer.convert_ids_to_tokens(calls[0][0][: int(mask[0].sum())])
    assert words == ["a", "cat", "aesthetic", "score", ":", "6", ".", "5", ".", "</s>"]
    policy.embed_prompts(["a dog"])
    assert len(calls) == 1
    policy.embed_prompts(["a bird", "a fish"])  # evicts the two oldest
    assert len(policy._text_cache) == 2


# ----------------------------------------------------------------------------------------------- gradients
def test_gradient_window_keeps_graph_only_in_last_steps_and_only_on_lora(tiny):
    policy = make_policy(tiny, micro_batch_size=2)
    randomize_lora(policy)  # so that LoRA A gets a gradient too (B != 0)
    grad_enabled = []
    policy.transformer.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    rollout = policy.sample(PROMPTS[:2], SEEDS[:2], gradient=GradientWindow(last_steps=2, checkpointing=False))
    assert grad_enabled == [False, True, True]
    assert rollout.frames is None and rollout.latents.requires_grad
    frames = policy.decode(rollout.latents, frame_indices=[3])
    assert frames.shape == (2, 1, 3, 32, 32)
    frames.mean().backward()
    trainable = {id(p) for p in policy.trainable_parameters()}
    for name, parameter in policy.transformer.named_parameters():
        if id(parameter) in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    assert all(p.grad is None for m in (policy.vae, policy.text_encoder) for p in m.parameters())


def test_checkpointed_window_gives_the_same_gradient(tiny):
    def lora_gradient(checkpointing):
        policy = make_policy(tiny)
        randomize_lora(policy)
        calls = []
        policy.transformer.spatial_blocks[0].norm1.register_forward_hook(lambda *args: calls.append(1))
        latents = policy.sample(PROMPTS[:1], SEEDS[:1], gradient=GradientWindow(2, checkpointing=checkpointing)).latents
        policy.decode(latents).pow(2).mean().backward()
        assert not policy.transformer.is_gradient_checkpointing  # switched off again after the window
        assert len(calls) == 3 + 2 * checkpointing  # the window's blocks ran again in the backward pass
        return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])

    torch.testing.assert_close(lora_gradient(True), lora_gradient(False), atol=1e-6, rtol=1e-4)


def test_decode_of_latent_frame_subsets_and_encode(tiny):
    policy = make_policy(tiny)
    latents = torch.randn(1, *LATENT, requires_grad=True)
    counts = {len(idx): policy.decode(latents, idx).shape[1] for idx in ([1], [0, 2], [0, 1, 2, 3, 4])}
    assert counts == {1: 1, 2: 5, 5: 17}  # k latent frames as a causal clip: 4k - 3 frames
    policy.decode(latents, [2]).sum().backward()
    assert latents.grad[:, 2].abs().sum() > 0 and latents.grad[:, [0, 1, 3, 4]].abs().sum() == 0
    assert policy.encode(policy.decode(latents.detach())).shape == latents.shape
    two_chunks = make_policy(tiny, num_frames=34)  # 2 micro-frame chunks of 17 -> 10 latent frames
    assert two_chunks.latent_shape == (4, 10, 4, 4)
    assert two_chunks.decode(torch.randn(1, 10, 4, 4, 4)).shape == (1, 34, 3, 32, 32)


# ----------------------------------------------------------------------------------------------- loss
def test_denoising_loss_is_the_rectified_flow_velocity_loss(tiny):
    policy = make_policy(tiny)
    generator = torch.Generator().manual_seed(3)
    latents = random_latents(3)
    timesteps = policy.sample_timesteps(3, generator)
    noise = policy.sample_noise(latents, generator)
    # Open-Sora's training draw: sigmoid(N(0, 1)) * 1000 through the timestep transform of the video size
    u = torch.sigmoid(torch.randn(3, generator=torch.Generator().manual_seed(3))) * 1000
    torch.testing.assert_close(timesteps, policy.transform_timesteps(u))
    assert ((0 < timesteps) & (timesteps < 1000)).all()
    prompts = ["a cat", "a dog", "a cat"]
    loss = policy.denoising_loss(latents, prompts, timesteps, noise)
    assert loss.shape == (3,)

    sigma = (timesteps / 1000).view(3, 1, 1, 1, 1)
    noisy = ((1 - sigma) * latents + sigma * noise).permute(0, 2, 1, 3, 4)
    caption, mask = policy.embed_prompts(prompts)
    size = {k: torch.full((3,), v) for k, v in (("fps", 24.0), ("height", 32.0), ("width", 32.0))}
    with torch.no_grad():
        velocity = policy.transformer(noisy, timesteps, caption, mask, **size)[:, :4].permute(0, 2, 1, 3, 4)
    manual = ((velocity - (latents - noise)) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss.detach(), manual, atol=1e-6, rtol=1e-5)
    loss.sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())


# ----------------------------------------------------------------------------------------------- adapters
def test_reference_is_base_then_follows_update_reference(tiny):
    policy = make_policy(tiny)
    latents, prompts = random_latents(2), PROMPTS[:2]
    base = fixed_loss(policy, latents, prompts)
    randomize_lora(policy, scale=0.1, seed=1)
    trained = fixed_loss(policy, latents, prompts)
    assert not torch.allclose(trained, base)
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, prompts), base)
    assert all(p.requires_grad for p in policy.trainable_parameters())  # restored after the context
    policy.update_reference()
    randomize_lora(policy, scale=0.1, seed=2)
    assert not torch.allclose(fixed_loss(policy, latents, prompts), trained)
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, prompts), trained)
    assert policy.has_reference_adapter and len(policy.transformer.peft_config) == 2


def test_checkpoint_round_trip_restores_adapter_and_reference(tiny):
    policy = make_policy(tiny)
    randomize_lora(policy, seed=1)
    policy.update_reference()
    randomize_lora(policy, seed=2)
    latents = random_latents(2)
    state = policy.state_dict_for_checkpoint()
    resumed = make_policy(tiny)
    resumed.load_state_dict_from_checkpoint(state)
    torch.testing.assert_close(fixed_loss(resumed, latents, PROMPTS[:2]), fixed_loss(policy, latents, PROMPTS[:2]))
    with policy.use_reference(), resumed.use_reference():
        torch.testing.assert_close(fixed_loss(resumed, latents, PROMPTS[:2]), fixed_loss(policy, latents, PROMPTS[:2]))
    with pytest.raises(VpoError, match="does not match"):
        make_policy(tiny, lora={"rank": 2}).load_state_dict_from_checkpoint(state)


def test_saved_adapter_loads_with_peft_onto_the_published_transformer(tiny, tmp_path):
    from peft import PeftModel

    policy = make_policy(tiny, lora={"rank": 4, "alpha": 8})  # alpha != rank: the scale must travel
    randomize_lora(policy, scale=0.2)
    policy.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_alpha"] == 8
    tuned = PeftModel.from_pretrained(STDiT3.from_pretrained(str(tiny / "transformer")), tmp_path / "lora").eval()
    inputs = (torch.randn(2, 4, 5, 4, 4), torch.tensor([900.0, 10.0]), torch.randn(2, 300, 32),
              torch.ones(2, 300, dtype=torch.long), torch.full((2,), 24.0), torch.full((2,), 32.0),
              torch.full((2,), 32.0))
    with torch.no_grad():
        expected = policy.transformer.eval()(*inputs)
        torch.testing.assert_close(tuned(*inputs), expected, atol=1e-4, rtol=1e-4)  # float noise of other kernels
        base = STDiT3.from_pretrained(str(tiny / "transformer"))(*inputs)
    assert (base - expected).abs().max() > 1e-3
    # ... and back into a fresh policy for sampling
    fresh = make_policy(tiny, lora={"rank": 4, "alpha": 8})
    fresh.load_adapter(tmp_path / "lora")
    torch.testing.assert_close(fresh.sample(PROMPTS[:1], SEEDS[:1]).latents, policy.sample(PROMPTS[:1], SEEDS[:1]).latents)
    with pytest.raises(VpoError, match="rank 4 / alpha 8.0, but the policy's lora: is rank 16"):
        make_policy(tiny).load_adapter(tmp_path / "lora")


def test_full_finetune_keeps_a_frozen_base_and_saves_the_published_layout(tiny, tmp_path):
    policy = make_policy(tiny, full_finetune=True, gradient_checkpointing=True)
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    latents = random_latents(1)
    base = fixed_loss(policy, latents, PROMPTS[:1])
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.mul_(1.1)
    changed = fixed_loss(policy, latents, PROMPTS[:1])
    assert not torch.allclose(changed, base)
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, PROMPTS[:1]), base)
    policy.save_pretrained(tmp_path / "out")
    reloaded = make_policy(tiny, model=str(tmp_path / "out"))  # the saved transformer is a `model:` again
    torch.testing.assert_close(fixed_loss(reloaded, latents, PROMPTS[:1]), changed)


# ----------------------------------------------------------------------------------------------- trajectories
def test_trajectory_log_probs_are_recomputed_by_transition(tiny):
    policy = make_policy(tiny, micro_batch_size=2)
    randomize_lora(policy, scale=0.1)
    settings = TrajectorySettings(noise_level=0.7)
    trajectory = policy.sample_trajectory(PROMPTS[:3], SEEDS[:3], settings)
    assert trajectory.latents.shape == (3, 4, *LATENT) and trajectory.log_probs.shape == (3, 3)
    assert trajectory.steps == [0, 1, 2] and trajectory.frames.shape == (3, 17, 3, 32, 32)
    assert torch.isfinite(trajectory.log_probs).all()
    rows, steps = [0, 2, 1, 0], [0, 1, 2, 2]
    transition = policy.transition(trajectory, rows, steps)
    torch.testing.assert_close(transition.log_prob.detach(), trajectory.log_probs[rows, steps], atol=2e-4, rtol=0)

    # The recorded log-prob is the Gaussian density of Flow-GRPO's SDE step, computed here from its formula.
    sigmas = trajectory.extras["sigmas"]
    sigma_max = sigmas[1].item()
    row, step = 2, 1
    x = trajectory.latents[row : row + 1, step]
    caption, mask = policy.embed_prompts([PROMPTS[row]])
    with torch.no_grad():
        v = policy._velocity(x, trajectory.extras["timesteps"][step : step + 1], caption, mask, True)
    sigma, following = sigmas[step].item(), sigmas[step + 1].item()
    dt = following - sigma
    std_t = 0.7 * math.sqrt(sigma / (1 - (sigma_max if sigma >= 1 else sigma)))
    flow_v = -v  # diffusers' flow velocity (noise - x0)
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + flow_v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    density = (-((trajectory.latents[row : row + 1, step + 1] - mean) ** 2) / (2 * std**2) - math.log(std)
               - 0.5 * math.log(2 * math.pi)).mean()
    torch.testing.assert_close(trajectory.log_probs[row, step], density, atol=2e-4, rtol=0)
    assert gaussian_log_prob(trajectory.latents[row : row + 1, step + 1], mean, std).item() == pytest.approx(
        density.item(), abs=1e-4)


def test_trajectory_rows_are_batch_invariant_and_windows_are_deterministic_outside(tiny):
    policy = make_policy(tiny, micro_batch_size=3)
    settings = TrajectorySettings(noise_level=0.7, window=(1, 2))
    batched = policy.sample_trajectory(PROMPTS[:3], SEEDS[:3], settings, decode=False)
    alone = make_policy(tiny).sample_trajectory(PROMPTS[2:3], SEEDS[2:3], settings, decode=False)
    torch.testing.assert_close(batched.latents[2:3], alone.latents, atol=1e-5, rtol=0)
    assert batched.steps == [1] and torch.isnan(batched.log_probs[:, [0, 2]]).all()
    assert torch.isfinite(batched.log_probs[:, 1]).all()
    # No stochastic step at all: the plain sampler's chain, initial noise included.
    plain = policy.sample_trajectory(PROMPTS[:3], SEEDS[:3], TrajectorySettings(window=(0, 0)), decode=False)
    assert plain.steps == [] and torch.isnan(plain.log_probs).all()
    sampled = policy.sample(PROMPTS[:3], SEEDS[:3], decode=False)
    torch.testing.assert_close(plain.latents[:, -1], sampled.latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.latents[:, :2], batched.latents[:, :2], atol=1e-6, rtol=0)  # up to the window
    assert (batched.latents[:, -1] - sampled.latents).abs().max() > 1e-3


def test_transition_has_a_graph_to_the_lora_weights_only_and_evaluates_the_reference(tiny):
    policy = make_policy(tiny)
    trajectory = policy.sample_trajectory(PROMPTS[:2], SEEDS[:2], TrajectorySettings(), decode=False)
    randomize_lora(policy, scale=0.1)
    transition = policy.transition(trajectory, [0, 1], [1, 2])
    assert transition.log_prob.requires_grad and transition.mean.shape == (2, *LATENT)
    transition.log_prob.sum().backward()
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert all(p.grad is None for p in policy.transformer.parameters() if id(p) not in trainable)
    with policy.use_reference(), torch.no_grad():
        reference = policy.transition(trajectory, [0, 1], [1, 2])
    torch.testing.assert_close(reference.log_prob, trajectory.log_probs[[0, 1], [1, 2]], atol=2e-4, rtol=0)
    assert not torch.allclose(reference.log_prob, transition.log_prob.detach(), atol=1e-3)


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_missing_or_mismatched_checkpoints(tiny, tmp_path):
    with pytest.raises(VpoError, match="does not exist"):
        make_policy(tiny, model=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VpoError, match="config.json is missing"):
        make_policy(tiny, model=str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny / "transformer" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(VpoError, match=r"no model.safetensors .*pytorch_model.bin.*not read"):
        make_policy(tiny, model=str(pickled))
    with pytest.raises(VpoError, match="model_type 'VideoAutoencoderPipeline', expected 'STDiT3'"):
        make_policy(tiny, model=str(tiny / "vae"))
    deeper = tmp_path / "deeper"
    config = json.loads((tiny / "transformer" / "config.json").read_text())
    deeper.mkdir()
    (deeper / "config.json").write_text(json.dumps({**config, "depth": 3}))
    (deeper / "model.safetensors").write_bytes((tiny / "transformer" / "model.safetensors").read_bytes())
    with pytest.raises(VpoError, match=r"do not fit .* missing \(e.g. \['spatial_blocks.2"):
        make_policy(tiny, model=str(deeper))
    wide = tmp_path / "wide"
    STDiT3(STDiT3Config.from_dict({**config, "caption_channels": 64})).save_pretrained(wide)
    with pytest.raises(VpoError, match="makes 32-dim features but STDiT3 .* caption_channels=64"):
        make_policy(tiny, model=str(wide))
    with pytest.raises(pydantic.ValidationError, match="at least 17"):
        OpenSoraConfig(num_frames=16)
    with pytest.raises(VpoError, match="one seed per row"):
        make_policy(tiny).sample(["a cat"], [1, 2])


def test_hub_ids_go_through_snapshot_download_with_safetensors_patterns(tiny, monkeypatch):
    import huggingface_hub

    fetched = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        fetched.append((repo_id, allow_patterns))
        if repo_id == "nobody/missing":
            raise OSError("404 Repository Not Found")
        return str(tiny / {"hpcai-tech/OpenSora-STDiT-v3": "transformer", "hpcai-tech/OpenSora-VAE-v1.2": "vae"}[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    policy = make_policy(tiny, model="hpcai-tech/OpenSora-STDiT-v3", vae="hpcai-tech/OpenSora-VAE-v1.2")
    assert [name for name, _ in fetched] == ["hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2"]
    assert all("*.safetensors" in patterns and not any("bin" in p for p in patterns) for _, patterns in fetched)
    assert policy.sample(["a cat"], [0], decode=False).latents.shape == (1, *LATENT)
    with pytest.raises(VpoError, match="could not fetch STDiT3 transformer 'nobody/missing' from the hub"):
        make_policy(tiny, model="nobody/missing")


def test_lora_sits_on_exactly_the_target_modules(tiny):
    from vpo_core.testing import lora_placement

    for targets in (["attn.qkv"], ["cross_attn.kv_linear", "mlp.fc2"]):
        adapted, matching = lora_placement(make_policy(tiny, lora={"rank": 2, "target_modules": targets}), targets)
        assert adapted and adapted == matching, targets
