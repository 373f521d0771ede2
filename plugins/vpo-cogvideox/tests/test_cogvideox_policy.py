"""The cogvideox policy on tiny random CogVideoX pipelines loaded through the plugin's real loading code."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pydantic
import pytest
import torch
from diffusers import CogVideoXPipeline
from vpo_core import BuildContext, GradientWindow, Policy, VpoError
from vpo_cogvideox import CogVideoXConfig, build, build_tiny_cogvideox

SETTINGS = dict(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=6.0)
PROMPTS = ["a cat running", "a cat running", "a red car in the city", "a red car in the city"]
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def tiny_2b(tmp_path_factory):
    return build_tiny_cogvideox(tmp_path_factory.mktemp("cogvideox") / "tiny-2b", seed=0)


@pytest.fixture(scope="module")
def tiny_5b(tmp_path_factory):
    return build_tiny_cogvideox(tmp_path_factory.mktemp("cogvideox") / "tiny-5b", seed=0, variant="5b")


def make_policy(directory, **overrides):
    config = CogVideoXConfig(model=str(directory), **{**SETTINGS, **overrides})
    return build(config, BuildContext(device=torch.device("cpu"), seed=0))


def stock_frames(directory, prompt, seed, lora_dir=None, **overrides):
    settings = {**SETTINGS, **overrides}
    pipe = CogVideoXPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="pt", **settings).frames


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


# ----------------------------------------------------------------------------------------------- sampling
def test_policy_satisfies_protocol_and_plugin_registers(tiny_2b):
    from vpo_cogvideox import plugin

    registered = {}
    plugin.vpo_register_policies(register=lambda name, factory, model: registered.update({name: (factory, model)}))
    assert registered["cogvideox"][1] is CogVideoXConfig
    policy = registered["cogvideox"][0](
        CogVideoXConfig(model=str(tiny_2b), **SETTINGS), BuildContext(device=torch.device("cpu"), seed=0)
    )
    assert isinstance(policy, Policy)
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert trainable and all(p.requires_grad == (id(p) in trainable) for p in policy.transformer.parameters())


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_batched_candidates_match_stock_pipeline(variant, tiny_2b, tiny_5b):
    directory = tiny_2b if variant == "2b" else tiny_5b
    # 5b: DPM scheduler (per-row noise in every step), rotary embeddings, dynamic CFG.
    extra = {"use_dynamic_cfg": True} if variant == "5b" else {}
    policy = make_policy(directory, micro_batch_size=4, **extra)
    rollout = policy.sample(PROMPTS, SEEDS)
    assert rollout.latents.shape == (4, 3, 4, 8, 8)
    assert rollout.frames.shape == (4, 9, 3, 32, 32)
    for row, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        expected = stock_frames(directory, prompt, seed, **extra)
        torch.testing.assert_close(rollout.frames[row : row + 1], expected, atol=2e-5, rtol=0)
    # Candidates of one prompt differ (different seeds).
    assert (rollout.frames[0] - rollout.frames[1]).abs().max() > 1e-3


def test_each_row_reproducible_alone_and_in_any_micro_batch(tiny_5b):
    batched = make_policy(tiny_5b, micro_batch_size=3).sample(PROMPTS, SEEDS, decode=False)
    single = make_policy(tiny_5b, micro_batch_size=1)
    for row in (0, 3):
        alone = single.sample([PROMPTS[row]], [SEEDS[row]], decode=False)
        torch.testing.assert_close(batched.latents[row : row + 1], alone.latents, atol=1e-5, rtol=0)


def test_text_embeddings_are_cached_per_prompt(tiny_2b):
    policy = make_policy(tiny_2b, text_cache_size=2)
    calls = []
    policy.text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    first = policy.embed_prompts(["a cat", "a dog", "a cat"])
    assert calls == [2]  # unique prompts, one batch
    again = policy.embed_prompts(["a dog"])
    assert calls == [2]
    torch.testing.assert_close(again[0], first[1])
    policy.embed_prompts(["a bird", "a fish"])  # evicts the two oldest
    assert len(policy._text_cache) == 2


# ----------------------------------------------------------------------------------------------- gradients
def test_gradient_window_keeps_graph_only_in_last_steps_and_only_on_trainable(tiny_2b):
    policy = make_policy(tiny_2b, micro_batch_size=2)
    randomize_lora(policy)  # so that LoRA A gets a gradient too (B != 0)
    grad_enabled = []
    policy.transformer.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    rollout = policy.sample(PROMPTS[:2], SEEDS[:2], gradient=GradientWindow(last_steps=2, checkpointing=False))
    assert grad_enabled == [False, True, True]
    assert rollout.frames is None and rollout.latents.requires_grad
    frames = policy.decode(rollout.latents, frame_indices=[0])
    assert frames.shape == (2, 1, 3, 32, 32)
    frames.mean().backward()
    trainable = {id(p) for p in policy.trainable_parameters()}
    for name, parameter in policy.transformer.named_parameters():
        if id(parameter) in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    for module in (policy.vae, policy.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_checkpointed_window_gives_the_same_gradient(tiny_5b):
    def lora_gradient(checkpointing):
        policy = make_policy(tiny_5b)
        randomize_lora(policy)
        window = GradientWindow(last_steps=2, checkpointing=checkpointing)
        latents = policy.sample(PROMPTS[:1], SEEDS[:1], gradient=window).latents
        policy.decode(latents).pow(2).mean().backward()
        assert not policy.transformer.is_gradient_checkpointing  # switched off again after the window
        return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])

    torch.testing.assert_close(lora_gradient(True), lora_gradient(False), atol=1e-6, rtol=1e-4)


def test_random_cutoff_is_drawn_from_the_seeds(tiny_2b):
    policy = make_policy(tiny_2b, num_inference_steps=6)
    window = GradientWindow(last_steps=6, random_cutoff=True, checkpointing=False)
    draws = {}
    for seed in range(8):
        first = policy.sample(["a cat"], [seed], gradient=window).extras["grad_steps"]
        assert first == policy.sample(["a cat"], [seed], gradient=window).extras["grad_steps"]
        draws[seed] = first
    assert all(1 <= k <= 6 for k in draws.values()) and len(set(draws.values())) > 1


def test_decode_of_latent_frame_subsets(tiny_2b):
    policy = make_policy(tiny_2b)
    latents = torch.randn(1, 3, 4, 8, 8, requires_grad=True)
    counts = {len(idx): policy.decode(latents, idx).shape[1] for idx in ([1], [0, 2], [0, 1, 2])}
    assert counts == {1: 1, 2: 8, 3: 9}  # 4k-3 frames for odd k, 4k for even k
    policy.decode(latents, [2]).sum().backward()
    assert latents.grad[:, 2].abs().sum() > 0 and latents.grad[:, :2].abs().sum() == 0
    encoded = policy.encode(policy.decode(latents.detach()))
    assert encoded.shape == latents.shape


# ----------------------------------------------------------------------------------------------- DPO loss
def test_denoising_loss_matches_manual_v_prediction(tiny_2b):
    policy = make_policy(tiny_2b)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(3, 3, 4, 8, 8, generator=generator)
    timesteps = policy.sample_timesteps(3, generator)
    noise = policy.sample_noise(latents, generator)
    assert timesteps.dtype == torch.long and ((0 <= timesteps) & (timesteps < 1000)).all()
    assert noise.shape == latents.shape
    prompts = ["a cat", "a dog", "a cat"]
    loss = policy.denoising_loss(latents, prompts, timesteps, noise)
    assert loss.shape == (3,)

    scheduler = policy.scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    embeds = policy.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu")[0]
    with torch.no_grad():
        prediction = policy.transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=timesteps).sample
    manual = ((prediction - target) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss.detach(), manual, atol=1e-6, rtol=1e-5)

    # Shared (t, noise) for a winner/loser pair vs independent draws.
    pair = latents[:2]
    shared = policy.denoising_loss(pair, prompts[:2], timesteps[:1].repeat(2), noise[:1].repeat(2, 1, 1, 1, 1))
    independent = policy.denoising_loss(pair, prompts[:2], timesteps[:2], noise[:2])
    assert shared.shape == independent.shape == (2,)
    assert not torch.allclose(shared, independent)
    loss.sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())


# ----------------------------------------------------------------------------------------------- adapters
def test_saved_lora_loads_in_stock_pipeline_and_reproduces_policy(tiny_2b, tmp_path):
    policy = make_policy(tiny_2b, lora={"rank": 4, "alpha": 8})  # alpha != rank: the scale must travel
    randomize_lora(policy)
    mine = policy.sample(PROMPTS[2:3], SEEDS[2:3]).frames
    policy.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    tuned = stock_frames(tiny_2b, PROMPTS[2], SEEDS[2], lora_dir=tmp_path / "lora")
    base = stock_frames(tiny_2b, PROMPTS[2], SEEDS[2])
    torch.testing.assert_close(tuned, mine, atol=2e-5, rtol=0)
    assert (tuned - base).abs().max() > 1e-3


def test_reference_is_base_then_follows_update_reference(tiny_2b):
    policy = make_policy(tiny_2b)
    latents = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = PROMPTS[:2]
    base = fixed_loss(policy, latents, prompts)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)

    def train_step(seed):
        randomize_lora(policy, scale=0.1, seed=seed)  # make B non-zero so plain SGD moves the output
        generator = torch.Generator().manual_seed(seed)
        timesteps = policy.sample_timesteps(2, generator)
        loss = policy.denoising_loss(latents, prompts, timesteps, policy.sample_noise(latents, generator)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step(1)
    trained = fixed_loss(policy, latents, prompts)
    assert not torch.allclose(trained, base)
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, prompts), base)
    assert all(p.requires_grad for p in policy.trainable_parameters())  # restored after the context

    policy.update_reference()
    assert policy.has_reference_adapter
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, prompts), trained)
    default_adapter = [name for name, _ in policy.transformer.named_parameters() if ".default." in name]
    assert len(policy.trainable_parameters()) == len(default_adapter)

    train_step(2)
    later = fixed_loss(policy, latents, prompts)
    assert not torch.allclose(later, trained)
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, prompts), trained)
    assert policy.has_reference_adapter and len(policy.transformer.peft_config) == 2  # one extra adapter at most
    policy.update_reference()
    assert len(policy.transformer.peft_config) == 2


def test_checkpoint_round_trip_restores_adapter_and_reference(tiny_2b):
    policy = make_policy(tiny_2b)
    randomize_lora(policy, seed=1)
    policy.update_reference()
    randomize_lora(policy, seed=2)
    latents = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    state = policy.state_dict_for_checkpoint()
    assert any(".reference." in key for key in state)

    resumed = make_policy(tiny_2b)
    resumed.load_state_dict_from_checkpoint(state)
    torch.testing.assert_close(fixed_loss(resumed, latents, PROMPTS[:2]), fixed_loss(policy, latents, PROMPTS[:2]))
    with policy.use_reference(), resumed.use_reference():
        torch.testing.assert_close(fixed_loss(resumed, latents, PROMPTS[:2]), fixed_loss(policy, latents, PROMPTS[:2]))
    with pytest.raises(VpoError, match="does not match"):
        make_policy(tiny_2b, lora={"rank": 2}).load_state_dict_from_checkpoint(state)


def test_full_finetune_keeps_a_frozen_base_and_saves_a_transformer(tiny_2b, tmp_path):
    policy = make_policy(tiny_2b, full_finetune=True)
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    latents = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    base = fixed_loss(policy, latents, PROMPTS[:1])
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.mul_(1.1)
    assert not torch.allclose(fixed_loss(policy, latents, PROMPTS[:1]), base)
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, PROMPTS[:1]), base)
    policy.update_reference()
    with policy.use_reference():
        torch.testing.assert_close(fixed_loss(policy, latents, PROMPTS[:1]), fixed_loss(policy, latents, PROMPTS[:1]))
    policy.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_user_mistakes(tiny_2b, tmp_path):
    with pytest.raises(VpoError, match="does not exist"):
        make_policy(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VpoError, match="missing subfolder"):
        make_policy(tmp_path / "empty")
    with pytest.raises(pydantic.ValidationError, match="num_frames - 1 must be divisible"):
        CogVideoXConfig(num_frames=10)
    with pytest.raises(pydantic.ValidationError):
        CogVideoXConfig(lora={"rank": 4, "unknown": 1})
    with pytest.raises(VpoError, match="xformers needs a CUDA device"):
        make_policy(tiny_2b, attention="xformers")
    with pytest.raises(VpoError, match="one seed per row"):
        make_policy(tiny_2b).sample(["a cat"], [1, 2])


def test_text_length_follows_the_transformer(tmp_path):
    # A model built for 16-token prompts (like the toy world's) samples with the default settings; forcing
    # CogVideoX's 226 on it is a clear error rather than a shape mismatch deep inside the transformer.
    short = build_tiny_cogvideox(tmp_path / "short-text", seed=0, max_text_length=16)
    policy = make_policy(short)
    assert policy.embed_prompts(["a cat"]).shape[1] == 16
    expected = stock_frames(short, "a cat", 3, max_sequence_length=16)
    torch.testing.assert_close(policy.sample(["a cat"], [3]).frames, expected, atol=2e-5, rtol=0)
    with pytest.raises(VpoError, match="max_sequence_length=226 does not match .* max_text_seq_length=16"):
        make_policy(short, max_sequence_length=226)


def test_xformers_processor_matches_cogvideox_sdpa_processor(tiny_5b, monkeypatch):
    """Runs the processor with a stand-in for xformers' kernel (xformers is CUDA-only)."""
    from diffusers import CogVideoXTransformer3DModel
    from vpo_cogvideox.attention import use_xformers

    def memory_efficient_attention(query, key, value):  # xformers layout [B, M, H, K]
        out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value)))
        return out.transpose(1, 2)

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)

    policy = make_policy(tiny_5b)
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_5b, subfolder="transformer")
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8),
        encoder_hidden_states=torch.randn(1, 226, 32),
        timestep=torch.tensor([500]),
        image_rotary_emb=policy._rotary(3, 32, 32),
    )
    with torch.no_grad():
        expected = transformer(**inputs).sample
        use_xformers(transformer)
        actual = transformer(**inputs).sample
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- reproducible bytes
def test_identical_weights_save_identical_bytes_whatever_the_hash_seed(tiny_2b, tmp_path):
    """Two processes with other PYTHONHASHSEEDs (set order) build the same adapter and save it: same bytes."""
    script = ("import sys, torch\n"
              "from vpo_core import BuildContext\n"
              "from vpo_cogvideox import CogVideoXConfig, build\n"
              "policy = build(CogVideoXConfig(model=sys.argv[1], num_frames=9, height=32, width=32,\n"
              "                               lora={'rank': 4, 'target_modules': ['to_v', 'to_k', 'to_q', 'to_out.0']}),\n"
              "               BuildContext(device=torch.device('cpu'), seed=3))\n"
              "torch.manual_seed(0)\n"
              "for parameter in policy.trainable_parameters():\n"
              "    parameter.data += torch.randn(parameter.shape)\n"
              "policy.save_pretrained(sys.argv[2])\n")
    outputs = [tmp_path / "seed-a", tmp_path / "seed-b"]
    children = [subprocess.Popen([sys.executable, "-c", script, str(tiny_2b), str(out)], stderr=subprocess.PIPE,
                                 env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"})
                for seed, out in zip(("11", "12"), outputs)]
    for child in children:
        assert child.wait(timeout=300) == 0, child.stderr.read().decode()[-2000:]
    first, second = ((out / "pytorch_lora_weights.safetensors").read_bytes() for out in outputs)
    assert b'"lora_adapter_metadata"' in first and first == second


def test_lora_sits_on_exactly_the_target_modules(tiny_2b):
    from vpo_core.testing import lora_placement

    for targets in (["to_k"], ["ff.net.2", "to_out.0"]):
        adapted, matching = lora_placement(make_policy(tiny_2b, lora={"rank": 2, "target_modules": targets}), targets)
        assert adapted and adapted == matching, targets
