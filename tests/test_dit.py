"""foundry's DiT, noise schedule, DDIM sampler and DiT directories against diffusers, the reference.

A DiT foundry saves loads in diffusers and predicts the same noise; a DiT diffusers saves loads in foundry; the
schedule's numbers are DDIMScheduler's for the config foundry writes; sampling matches a loop over diffusers'
DDIMScheduler.step; bad input gets a UserError.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from foundry.config.vision_config import VISION_PRESETS, DiTConfig  # noqa: E402
from foundry.core.errors import UserError  # noqa: E402
from foundry.hub.diffusion import is_dit_dir, load_dit, save_dit  # noqa: E402
from foundry.infer.diffusion import ddim_timesteps, sample  # noqa: E402
from foundry.model.dit import DiT  # noqa: E402
from foundry.model.noise_schedule import NoiseSchedule  # noqa: E402

TOL = 1e-4  # fp32 max |diff| of predictions (measured: 0.0 on CPU)
SAMPLE_TOL = 1e-5  # of sampled images (measured: 0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_dit(config: DiTConfig, seed: int = 0) -> DiT:
    """A DiT initialised as the paper says, then perturbed so that its zero-initialised parts are not zero."""
    model = DiT(config)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def inputs(config: DiTConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    t[0], t[1] = 0, 999
    labels = torch.randint(0, config.num_classes + 1, (batch,), generator=gen)  # the null class included
    labels[0] = config.num_classes
    return x, t, labels


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(foundry's tiny DiT, the directory it was saved to)."""
    model = random_dit(VISION_PRESETS["dit-tiny"])
    out = save_dit(tmp_path_factory.mktemp("dit") / "dit", model, NoiseSchedule(), meta={"recipe": "test"})
    return model, out


# ---- the transformer ---------------------------------------------------------------------------

def test_foundry_dit_loads_in_diffusers_and_predicts_the_same_noise(saved):
    model, out = saved
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # diffusers' loggers do not propagate to pytest's caplog
    logging.getLogger("diffusers").addHandler(handler)
    try:
        ref = diffusers.DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not records, [r.getMessage() for r in records]  # foundry's "_foundry" key loads without a warning
    assert set(ref.state_dict()) - {"pos_embed.pos_embed"} == set(model.state_dict())  # the file's names are ours
    x, t, labels = inputs(model.config, 6)
    with torch.no_grad():
        ours, theirs = model(x, t, labels), ref(x, t, labels).sample
    assert ours.abs().max() > 0.1  # not the zero output of an untouched adaLN-Zero init
    assert (ours - theirs).abs().max().item() < TOL


def test_every_component_of_model_index_loads_in_diffusers(saved):
    _, out = saved
    index = json.loads((out / "model_index.json").read_text())
    components = {name: spec for name, spec in index.items() if not name.startswith("_")}
    assert set(components) == {"transformer", "scheduler"}
    for name, (library, cls) in components.items():
        assert library == "diffusers"
        getattr(diffusers, cls).from_pretrained(out, subfolder=name)
    assert json.loads((out / "foundry.json").read_text()) == {"recipe": "test"}


def test_diffusers_dit_loads_in_foundry(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=2,
                                          num_layers=2, sample_size=8, patch_size=4, num_embeds_ada_norm=5,
                                          norm_eps=1e-6).eval()
    ref.save_pretrained(tmp_path / "transformer")  # a bare transformer folder: no model_index.json, no scheduler
    assert is_dit_dir(tmp_path / "transformer")
    loaded = load_dit(tmp_path / "transformer")
    config = loaded.model.config
    assert (config.num_classes, config.patch_size, config.in_channels, config.norm_eps) == (5, 4, 2, 1e-6)
    assert config.has_null_class  # diffusers always builds, and trains, the null row
    assert loaded.schedule == NoiseSchedule.from_scheduler_config(diffusers.DDIMScheduler().config)
    x, t, labels = inputs(config, 5)
    with torch.no_grad():
        diff = (loaded.model(x, t, labels) - ref(x, t, labels).sample).abs().max().item()
    assert diff < TOL


def test_round_trip_keeps_weights_config_and_schedule(saved, tmp_path):
    model, out = saved
    assert is_dit_dir(out) and not is_dit_dir(tmp_path)
    loaded = load_dit(out)
    assert loaded.model.config == model.config and loaded.schedule == NoiseSchedule()
    assert loaded.meta == {"recipe": "test"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    # a run directory names its newest checkpoint
    (tmp_path / "latest").write_text(str(out))
    assert is_dit_dir(tmp_path) and load_dit(tmp_path).path == out


def test_init_weights_is_adaln_zero_and_seeded():
    config = VISION_PRESETS["dit-tiny"]
    a, b = DiT(config), DiT(config)
    a.init_weights(3)
    b.init_weights(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    x, t, labels = inputs(config, 3)
    assert torch.count_nonzero(a(x, t, labels)) == 0  # every block the identity, the output layer zero
    assert a.transformer_blocks[0].attn1.to_q.weight.std() > 0


def test_drop_labels_uses_the_null_class_at_the_dropout_rate():
    model = DiT(VISION_PRESETS["dit-tiny"])
    labels = torch.arange(10).repeat(1000)
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    changed = dropped != labels
    assert torch.all(dropped[changed] == model.null_class)
    assert 0.08 < changed.float().mean().item() < 0.12
    plain = DiT(VISION_PRESETS["dit-tiny"].replace(class_dropout_prob=0.0))
    assert torch.equal(plain.drop_labels(labels), labels)


# ---- the noise schedule ------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [
    NoiseSchedule(),
    NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                  timestep_spacing="leading", steps_offset=1),
    NoiseSchedule(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace",
                  set_alpha_to_one=False, clip_sample=True),
])
def test_schedule_matches_ddim_scheduler(schedule):
    ref = diffusers.DDIMScheduler.from_config(schedule.to_scheduler_config())
    assert torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 7, schedule.num_train_timesteps // 2, schedule.num_train_timesteps - 1])
    assert (schedule.add_noise(x0, noise, t) - ref.add_noise(x0, noise, t)).abs().max() < 1e-6
    expected = noise if schedule.prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
    assert (schedule.target(x0, noise, t) - expected).abs().max() < 1e-6
    for steps in (1, 7, 10, 50, schedule.num_train_timesteps - 1):
        ref.set_timesteps(steps)
        assert ddim_timesteps(schedule, steps) == ref.timesteps.tolist(), steps
    assert NoiseSchedule.from_scheduler_config(dict(ref.config)) == schedule


def test_schedule_reads_ddim_defaults_and_refuses_what_it_cannot_reproduce():
    assert NoiseSchedule.from_scheduler_config({}) == NoiseSchedule.from_scheduler_config(
        dict(diffusers.DDIMScheduler().config))
    for bad in ({"rescale_betas_zero_snr": True}, {"trained_betas": [0.1, 0.2]}, {"prediction_type": "sample"},
                {"beta_schedule": "exp"}):
        with pytest.raises(UserError, match=next(iter(bad))):
            NoiseSchedule.from_scheduler_config(bad)


# ---- sampling ----------------------------------------------------------------------------------

TARGET = torch.linspace(-0.6, 0.6, 64).reshape(1, 1, 8, 8)  # the image the steered models denoise towards


def steer(x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The exact prediction (noise, or v) at x_t for the clean image TARGET. An untrained DiT's samples run far
    outside [-1, 1], where the clamp would hide any difference; a model that is mostly this one stays inside
    (and a 1% change of the DiT's part moves its samples by 4e-4 to 1e-2, far above SAMPLE_TOL)."""
    alpha = schedule.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
    eps = (x - alpha**0.5 * TARGET) / (1 - alpha) ** 0.5
    return eps if schedule.prediction_type == "epsilon" else alpha**0.5 * eps - (1 - alpha) ** 0.5 * TARGET


class SteeredDiT(DiT):
    """foundry's DiT, its prediction pulled towards TARGET's exact one (the DiT's own part still class-dependent)."""

    schedule = NoiseSchedule()

    def forward(self, sample, timestep, class_labels):
        return 0.9 * steer(sample, timestep, self.schedule) + 0.2 * super().forward(sample, timestep, class_labels)


def diffusers_sample(model, schedule: NoiseSchedule, labels, steps, guidance, noise, eta=0.0, generator=None):
    """DDIM with classifier-free guidance as DiTPipeline runs it, over diffusers' DDIMScheduler, with diffusers'
    transformer steered as SteeredDiT is."""
    scheduler = diffusers.DDIMScheduler.from_config(schedule.to_scheduler_config())
    scheduler.set_timesteps(steps)
    null = torch.full_like(labels, model.config.num_embeds_ada_norm)

    def predict(x, t, classes):
        t = t.expand(len(x))
        return 0.9 * steer(x, t, schedule) + 0.2 * model(x, t, classes).sample

    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if guidance != 1:
                cond, uncond = predict(torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
                out = uncond + guidance * (cond - uncond)
            else:
                out = predict(x, t, labels)
            x = scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("guidance, steps, eta, schedule", [
    (1.0, 10, 0.0, NoiseSchedule()),
    (3.0, 10, 0.0, NoiseSchedule()),
    (3.0, 7, 1.0, NoiseSchedule()),  # 7 does not divide 1000: diffusers' previous-timestep rule
    (2.0, 8, 0.0, NoiseSchedule(prediction_type="v_prediction", clip_sample=True)),
    (3.0, 5, 0.0, NoiseSchedule(timestep_spacing="leading", steps_offset=1, clip_sample=True)),
    (3.0, 5, 0.0, NoiseSchedule(timestep_spacing="linspace", set_alpha_to_one=False)),
])
def test_sample_matches_a_loop_over_diffusers_ddim(saved, guidance, steps, eta, schedule):
    model, out = saved
    steered = SteeredDiT(model.config)
    steered.load_state_dict(model.state_dict())
    steered.schedule = schedule
    ref = diffusers.DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    labels = torch.tensor([0, 4, 9])
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample(steered, schedule, labels, steps=steps, guidance=guidance, noise=noise, eta=eta,
                  generator=torch.Generator().manual_seed(2))
    theirs = diffusers_sample(ref, schedule, labels, steps, guidance, noise, eta, torch.Generator().manual_seed(2))
    assert ours.shape == (3, 1, 8, 8)
    assert (ours.abs() < 1).float().mean() > 0.5  # mostly inside the clamp, so the comparison can see a difference
    assert (ours - theirs).abs().max().item() < SAMPLE_TOL


def test_sample_draws_its_noise_from_the_generator(saved):
    model, _ = saved
    labels = torch.tensor([1, 2])
    a = sample(model, NoiseSchedule(), labels, steps=4, generator=torch.Generator().manual_seed(5))
    b = sample(model, NoiseSchedule(), labels, steps=4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, sample(model, NoiseSchedule(), labels, steps=4, noise=noise))


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_gets_a_user_error(saved, tmp_path):
    model, out = saved
    plain = DiT(VISION_PRESETS["dit-tiny"].replace(class_dropout_prob=0.0))
    schedule = NoiseSchedule()
    with pytest.raises(UserError, match="null class"):
        sample(plain, schedule, torch.tensor([1]), steps=2, guidance=3.0)
    with pytest.raises(UserError, match="class id 10 is out of range"):
        sample(plain, schedule, torch.tensor([1, 10]), steps=2)
    with pytest.raises(UserError, match="class id 11 is out of range"):
        sample(model, schedule, torch.tensor([11]), steps=2)
    with pytest.raises(UserError, match="class id -1"):
        sample(model, schedule, torch.tensor([-1]), steps=2)
    with pytest.raises(UserError, match="steps"):
        sample(model, schedule, torch.tensor([1]), steps=0)
    with pytest.raises(UserError, match="noise has shape"):
        sample(model, schedule, torch.tensor([1]), steps=2, noise=torch.zeros(2, 1, 8, 8))
    with pytest.raises(UserError, match="multiple of patch_size"):
        DiTConfig(sample_size=9, patch_size=2, in_channels=1, num_layers=1, num_attention_heads=1,
                  attention_head_dim=4, num_classes=2)
    with pytest.raises(UserError, match="learned variance"):
        DiTConfig.from_diffusers_dict({**model.config.to_diffusers_dict(), "out_channels": 2})
    with pytest.raises(UserError, match="not an empty directory"):
        save_dit(out, model, schedule)
    with pytest.raises(UserError, match="not found"):
        load_dit(tmp_path / "nowhere")


def test_damaged_directories_name_what_is_wrong(saved, tmp_path):
    model, _ = saved
    out = save_dit(tmp_path / "dit", model, NoiseSchedule())
    config = json.loads((out / "transformer/config.json").read_text())
    (out / "transformer/config.json").write_text(json.dumps({**config, "num_layers": 5}))
    with pytest.raises(UserError, match="missing: transformer_blocks.4"):
        load_dit(out)
    (out / "transformer/config.json").write_text(json.dumps({**config, "num_embeds_ada_norm": 12}))
    with pytest.raises(UserError, match="embedding_table.weight has shape"):
        load_dit(out)
    (out / "transformer/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors"):
        load_dit(out)
    (out / "transformer/config.json").unlink()
    with pytest.raises(UserError, match="incomplete DiT directory"):
        load_dit(out)
