"""The wan policy on tiny random Wan 2.1 / 2.2 pipelines saved with save_pretrained and loaded by the plugin's real
loading code (the path a hub id takes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pydantic
import pytest
import torch
from diffusers import WanPipeline
from vpo_core import BuildContext, GradientWindow, Policy, VpoError
from vpo_wan import WanConfig, build, build_tiny_wan
from vpo_wan.testing import tiny_size

PROMPTS = ["a cat running", "a red car in the city", "a cat running"]
SEEDS = [11, 12, 13]


def settings(variant="2.1", **overrides):
    size = tiny_size(variant)
    return {"num_frames": 9, "height": size, "width": size, "num_inference_steps": 4, "guidance_scale": 5.0,
            **overrides}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {variant: build_tiny_wan(root / variant, variant=variant) for variant in ("2.1", "2.2-a14b", "2.2-ti2v")}


def make_policy(directory, variant="2.1", **overrides):
    config = WanConfig(model=str(directory), **settings(variant, **overrides))
    return build(config, BuildContext(device=torch.device("cpu"), seed=0))


def stock_frames(directory, prompt, seed, variant="2.1", lora=(), **overrides):
    pipe = WanPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    for kwargs in lora:
        pipe.load_lora_weights(**kwargs)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="pt", **settings(variant, **overrides)).frames


def randomize_lora(policy, scale=0.5, seed=0):
    """Stand-in for training: LoRA B starts at zero, so give the adapter a visible effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


# ----------------------------------------------------------------------------------------------- sampling
def test_plugin_registers_a_policy_that_satisfies_the_protocol(tiny):
    from vpo_wan import plugin

    registered = {}
    plugin.vpo_register_policies(register=lambda name, factory, model: registered.update({name: (factory, model)}))
    factory, model = registered["wan"]
    assert model is WanConfig and "trajectories" in WanConfig.capabilities
    policy = factory(WanConfig(model=str(tiny["2.1"]), **settings()), BuildContext(device=torch.device("cpu"), seed=0))
    assert isinstance(policy, Policy)
    assert not any(p.requires_grad for m in (policy.vae, policy.text_encoder) for p in m.parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert trainable and all(p.requires_grad == (id(p) in trainable) for p in policy.transformer.parameters())
    adapted = policy.trainable.adapted_module_names()
    assert any(n.endswith("attn1.to_q") for n in adapted) and any(n.endswith("attn2.to_out.0") for n in adapted)
    assert any(n.endswith("ffn.net.0.proj") for n in adapted) and any(n.endswith("ffn.net.2") for n in adapted)


@pytest.mark.parametrize("variant, extra", [("2.1", {}), ("2.2-a14b", {"guidance_scale_2": 3.0}), ("2.2-ti2v", {})])
def test_batched_rows_match_the_stock_pipeline(tiny, variant, extra):
    policy = make_policy(tiny[variant], variant, micro_batch_size=3, **extra)
    rollout = policy.sample(PROMPTS, SEEDS)
    size = tiny_size(variant)
    assert rollout.latents.shape == (3, 3, 4, size // policy.pipe.vae_scale_factor_spatial,
                                     size // policy.pipe.vae_scale_factor_spatial)  # frame-first
    assert rollout.frames.shape == (3, 9, 3, size, size)
    for row, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        expected = stock_frames(tiny[variant], prompt, seed, variant, **extra)
        difference = (rollout.frames[row : row + 1] - expected).abs().max().item()
        print(f"{variant} row {row}: max |policy - stock WanPipeline| = {difference:.2e}")
        assert difference < 2e-5
    assert rollout.frames.std() > 1e-2  # not a saturated image that would match anything
    assert (rollout.frames[0] - rollout.frames[2]).abs().max() > 1e-3  # same prompt, other seed


def test_two_experts_are_both_used_with_their_own_guidance(tiny):
    policy = make_policy(tiny["2.2-a14b"], "2.2-a14b")
    calls = {name: [] for name in ("transformer", "transformer_2")}
    for name in calls:
        getattr(policy.pipe, name).register_forward_hook(lambda m, a, k, out, name=name: calls[name].append(1),
                                                         with_kwargs=True)
    base = policy.sample(PROMPTS[:1], SEEDS[:1], decode=False).latents
    assert len(calls["transformer"]) == 6 and len(calls["transformer_2"]) == 2  # 3 + 1 steps, CFG: 2 passes each
    other = make_policy(tiny["2.2-a14b"], "2.2-a14b", guidance_scale_2=1.5).sample(PROMPTS[:1], SEEDS[:1], decode=False)
    assert (other.latents - base).abs().max() > 1e-4


def test_each_row_reproducible_alone_and_in_any_micro_batch(tiny):
    batched = make_policy(tiny["2.2-a14b"], "2.2-a14b", micro_batch_size=2).sample(PROMPTS, SEEDS, decode=False)
    single = make_policy(tiny["2.2-a14b"], "2.2-a14b")
    for row in (0, 2):
        alone = single.sample([PROMPTS[row]], [SEEDS[row]], decode=False)
        torch.testing.assert_close(batched.latents[row : row + 1], alone.latents, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- gradients
def test_gradient_window_keeps_graph_only_in_the_last_steps_and_only_on_lora(tiny):
    policy = make_policy(tiny["2.1"], micro_batch_size=2)
    randomize_lora(policy)  # so that LoRA A gets a gradient too (B != 0)
    grad_enabled = []
    policy.transformer.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    rollout = policy.sample(PROMPTS[:2], SEEDS[:2], gradient=GradientWindow(last_steps=2, checkpointing=False))
    assert grad_enabled == [False] * 4 + [True] * 4  # 4 steps x (cond, uncond)
    assert rollout.frames is None and rollout.latents.requires_grad
    policy.decode(rollout.latents, frame_indices=[2]).mean().backward()
    trainable = {id(p) for p in policy.trainable_parameters()}
    for name, parameter in policy.transformer.named_parameters():
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == (id(parameter) in trainable), name
    assert all(p.grad is None for m in (policy.vae, policy.text_encoder) for p in m.parameters())


def test_checkpointed_window_gives_the_same_gradient(tiny):
    def lora_gradient(checkpointing):
        policy = make_policy(tiny["2.1"])
        randomize_lora(policy)
        latents = policy.sample(PROMPTS[:1], SEEDS[:1], gradient=GradientWindow(2, checkpointing=checkpointing)).latents
        policy.decode(latents).pow(2).mean().backward()
        assert not policy.transformer.is_gradient_checkpointing  # switched off again after the window
        return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])

    torch.testing.assert_close(lora_gradient(True), lora_gradient(False), atol=1e-6, rtol=1e-4)


def test_experts_choose_what_trains(tiny):
    low = make_policy(tiny["2.2-a14b"], "2.2-a14b", experts="low_noise")
    assert low.trained == ["transformer_2"]
    assert not any(p.requires_grad for p in low.pipe.transformer.parameters())
    randomize_lora(low)
    low.decode(low.sample(PROMPTS[:1], SEEDS[:1], gradient=GradientWindow(1)).latents, [0]).mean().backward()
    assert all(p.grad is not None for p in low.trainable_parameters())
    assert low.pipe.config.boundary_ratio == 0.875
    assert (low.sample_timesteps(64, torch.Generator().manual_seed(0)) < 875).all()

    high = make_policy(tiny["2.2-a14b"], "2.2-a14b", experts="high_noise")
    assert (high.sample_timesteps(64, torch.Generator().manual_seed(0)) >= 875).all()
    with pytest.raises(VpoError, match="only runs \\['transformer_2'\\], which is not trained"):
        high.sample(PROMPTS[:1], SEEDS[:1], gradient=GradientWindow(1))

    both = make_policy(tiny["2.2-a14b"], "2.2-a14b")
    names = {n.split(".")[0] for n, _ in both.trainable.module.named_parameters() if ".lora_" in n}
    assert names == {"transformer", "transformer_2"}  # one trainable module holds both experts' adapters


# ----------------------------------------------------------------------------------------------- VAE
def test_decode_of_latent_frame_subsets_and_encode(tiny):
    policy = make_policy(tiny["2.1"])
    latents = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    counts = {len(idx): policy.decode(latents, idx).shape[1] for idx in ([1], [0, 2], [0, 1, 2])}
    assert counts == {1: 1, 2: 5, 3: 9}  # causal VAE: the first latent frame gives one frame, each later one 4
    policy.decode(latents, [2]).sum().backward()
    assert latents.grad[:, 2].abs().sum() > 0 and latents.grad[:, :2].abs().sum() == 0
    assert policy.encode(policy.decode(latents.detach())).shape == latents.shape


def test_vae_slicing_and_tiling_decode_the_same_frames(tiny):
    latents = make_policy(tiny["2.1"]).sample(PROMPTS, SEEDS, decode=False).latents
    frames = {}
    for slicing in (True, False, "auto"):
        policy = make_policy(tiny["2.1"], vae_slicing=slicing)
        calls = []
        policy.vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
        frames[slicing] = policy.decode(latents)
        assert set(calls) == ({1} if slicing is True else {3})  # "auto" on CPU: one batched decode
    torch.testing.assert_close(frames[True], frames[False], atol=1e-6, rtol=0)
    tiled = make_policy(tiny["2.1"], vae_tiling=True)
    assert tiled.vae.use_tiling
    tiled.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                            tile_sample_stride_width=8)
    assert tiled.decode(latents).shape == frames[True].shape


def test_vae_slicing_auto_on_cuda_decides_from_the_measured_row_peak_and_free_memory(tiny, monkeypatch):
    policy = make_policy(tiny["2.1"])
    policy.device = torch.device("cuda")  # only the decision is exercised (no GPU here)
    free, reserved, allocated = 1000, 300, 200  # bytes: 1000 free on the device + 100 cached by torch
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 10**6))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated)
    assert policy._vae_slicing(4)  # not measured yet: slice, and measure the first row
    assert not policy._vae_slicing(1)
    policy._decode_bytes = 100
    assert not policy._vae_slicing(9)  # 900 <= 0.9 x 1100
    assert policy._vae_slicing(10)


# ----------------------------------------------------------------------------------------------- training loss
def test_denoising_loss_is_the_flow_matching_loss_of_each_rows_expert(tiny):
    policy = make_policy(tiny["2.2-a14b"], "2.2-a14b")
    randomize_lora(policy, scale=0.1)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([950.0, 300.0])  # one row per expert
    noise = policy.sample_noise(latents, generator)
    prompts = ["a cat", "a dog"]
    loss = policy.denoising_loss(latents, prompts, timesteps, noise)

    embeds = policy.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512,
                                       device="cpu")[0]
    manual = []
    for row, expert in enumerate((policy.pipe.transformer, policy.pipe.transformer_2)):
        sigma = timesteps[row] / 1000
        noisy = ((1 - sigma) * latents[row] + sigma * noise[row]).permute(1, 0, 2, 3)[None]
        with torch.no_grad():
            velocity = expert(hidden_states=noisy, timestep=timesteps[row : row + 1],
                              encoder_hidden_states=embeds[row : row + 1]).sample
        manual.append((velocity[0].permute(1, 0, 2, 3) - (noise[row] - latents[row])).pow(2).mean())
    torch.testing.assert_close(loss.detach(), torch.stack(manual), atol=1e-6, rtol=1e-5)
    loss.sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())

    drawn = make_policy(tiny["2.1"]).sample_timesteps(4000, torch.Generator().manual_seed(0))
    sigma = drawn / 1000
    assert drawn.dtype == torch.float32 and ((0 < sigma) & (sigma <= 1)).all()
    # sigma = 5u / (1 + 4u) with u uniform: P(sigma < 5/9) = P(u < 0.2) = 0.2 (shift 5 favours high noise)
    assert abs((sigma < 5 / 9).float().mean().item() - 0.2) < 0.03


# ----------------------------------------------------------------------------------------------- adapters
def test_saved_lora_loads_in_the_stock_pipeline_and_reproduces_the_policy(tiny, tmp_path):
    policy = make_policy(tiny["2.1"], lora={"rank": 4, "alpha": 8})  # alpha != rank: the scale must travel
    randomize_lora(policy)
    mine = policy.sample(PROMPTS[1:2], SEEDS[1:2]).frames
    policy.save_pretrained(tmp_path / "lora")
    lora = [{"pretrained_model_name_or_path_or_dict": tmp_path / "lora"}]
    tuned = stock_frames(tiny["2.1"], PROMPTS[1], SEEDS[1], lora=lora)
    torch.testing.assert_close(tuned, mine, atol=2e-5, rtol=0)
    assert (tuned - stock_frames(tiny["2.1"], PROMPTS[1], SEEDS[1])).abs().max() > 1e-3


def test_two_expert_lora_loads_into_both_stock_transformers(tiny, tmp_path):
    policy = make_policy(tiny["2.2-a14b"], "2.2-a14b", lora={"rank": 4})
    randomize_lora(policy)
    mine = policy.sample(PROMPTS[:1], SEEDS[:1]).frames
    policy.save_pretrained(tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"]
    lora = [{"pretrained_model_name_or_path_or_dict": tmp_path / "lora"},
            {"pretrained_model_name_or_path_or_dict": tmp_path / "lora", "load_into_transformer_2": True,
             "weight_name": "pytorch_lora_weights_transformer_2.safetensors"}]
    torch.testing.assert_close(stock_frames(tiny["2.2-a14b"], PROMPTS[0], SEEDS[0], "2.2-a14b", lora=lora), mine,
                               atol=2e-5, rtol=0)


SAVE = """
import torch
from vpo_core import BuildContext
from vpo_wan import WanConfig, build
policy = build(WanConfig(model=MODEL, num_frames=9, height=32, width=32, lora={"rank": 4}),
               BuildContext(device=torch.device("cpu"), seed=7))
with torch.no_grad():
    for parameter in policy.trainable_parameters():
        parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
policy.save_pretrained(OUT)
"""


def test_save_pretrained_writes_identical_bytes_in_a_process_with_another_hash_seed(tiny, tmp_path):
    """Set order (peft's target_modules) follows PYTHONHASHSEED and safetensors' metadata order changes from process
    to process: a LoRA saved here and one saved by a process with another hash seed must be the same bytes."""
    model = str(tiny["2.2-a14b"])
    hash_seed = str(int(os.environ.get("PYTHONHASHSEED", "0") or 0) + 1)  # differs from ours (random if unset)
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", f"MODEL, OUT = {model!r}, {str(tmp_path / 'child')!r}\n" + SAVE],
                             env=env, stderr=subprocess.PIPE)
    exec(SAVE, {"MODEL": model, "OUT": tmp_path / "here"})
    assert child.wait(timeout=300) == 0, child.stderr.read().decode()[-2000:]
    names = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "child").iterdir()) and len(names) == 2
    for name in names:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "child" / name).read_bytes(), name


def test_canonical_safetensors_sorts_the_metadata_and_keeps_the_tensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from vpo_core.diffusers_policy import canonical_safetensors

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    metadata = {key: f"value {key}" for key in ("zeta", "format", "alpha", "lora_adapter_metadata", "mu")}
    save_file(tensors, tmp_path / "x.safetensors", metadata=metadata)
    canonical_safetensors(tmp_path / "x.safetensors")
    header = (tmp_path / "x.safetensors").read_bytes()[8:400].decode(errors="replace")
    assert [header.index(f'"{key}"') for key in sorted(metadata)] == sorted(header.index(f'"{k}"') for k in metadata)
    with safe_open(tmp_path / "x.safetensors", "pt") as file:
        assert file.metadata() == metadata
        assert all(torch.equal(file.get_tensor(k), v) for k, v in tensors.items())


def test_reference_and_checkpoint_round_trip_with_two_trained_experts(tiny):
    policy = make_policy(tiny["2.2-a14b"], "2.2-a14b")
    latents = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    timesteps, noise = torch.tensor([950.0, 300.0]), torch.randn(latents.shape, generator=torch.Generator())

    def loss(p):
        with torch.no_grad():
            return p.denoising_loss(latents, PROMPTS[:2], timesteps, noise)

    base = loss(policy)
    randomize_lora(policy, seed=1)
    trained = loss(policy)
    assert (trained - base).abs().min() > 0  # both rows (both experts) moved
    with policy.use_reference():
        torch.testing.assert_close(loss(policy), base)
    policy.update_reference()
    randomize_lora(policy, seed=2)
    with policy.use_reference():
        torch.testing.assert_close(loss(policy), trained)

    resumed = make_policy(tiny["2.2-a14b"], "2.2-a14b")
    resumed.load_state_dict_from_checkpoint(policy.state_dict_for_checkpoint())
    torch.testing.assert_close(loss(resumed), loss(policy))
    with resumed.use_reference():
        torch.testing.assert_close(loss(resumed), trained)
    with pytest.raises(VpoError, match="does not match"):
        make_policy(tiny["2.2-a14b"], "2.2-a14b", experts="low_noise").load_state_dict_from_checkpoint(
            policy.state_dict_for_checkpoint())


def test_full_finetune_keeps_a_frozen_reference_and_saves_the_transformer(tiny, tmp_path):
    policy = make_policy(tiny["2.1"], full_finetune=True)
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    latents = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    args = (latents, PROMPTS[:1], torch.tensor([500.0]), torch.randn(latents.shape, generator=torch.Generator()))
    base = policy.denoising_loss(*args).detach()
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.mul_(1.1)
    assert not torch.allclose(policy.denoising_loss(*args).detach(), base)
    with policy.use_reference():
        torch.testing.assert_close(policy.denoising_loss(*args).detach(), base)
    policy.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_user_mistakes(tiny, tmp_path):
    with pytest.raises(VpoError, match="does not exist"):
        make_policy(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VpoError, match="missing subfolder"):
        make_policy(tmp_path / "empty")
    with pytest.raises(VpoError, match="needs a two-expert Wan 2.2 A14B checkpoint"):
        make_policy(tiny["2.1"], experts="low_noise")
    with pytest.raises(VpoError, match="multiples of 32"):
        make_policy(tiny["2.2-ti2v"], "2.2-ti2v", height=48)
    with pytest.raises(pydantic.ValidationError, match="num_frames - 1 must be divisible"):
        WanConfig(num_frames=10)
    with pytest.raises(pydantic.ValidationError, match="divisible by 16"):
        WanConfig(height=40)
    with pytest.raises(VpoError, match="one seed per row"):
        make_policy(tiny["2.1"]).sample(["a cat"], [1, 2])


def test_lora_sits_on_exactly_the_target_modules(tiny):
    from vpo_core.testing import lora_placement

    for targets in (["attn1.to_k"], ["ffn.net.2", "attn2.to_q"]):
        policy = make_policy(tiny["2.1"], lora={"rank": 2, "target_modules": targets})
        adapted, matching = lora_placement(policy, targets)
        assert adapted and adapted == matching, targets
