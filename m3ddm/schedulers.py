"""The SD-1.5 noise schedule, add_noise, and the PNDM (PLMS) and DDIM samplers. Imports torch only.

Both samplers use SD-1.5's settings: "leading" timestep spacing, steps_offset 1, set_alpha_to_one False
(the step after the last one uses alphas_cumprod[0]), epsilon prediction, no sample clipping.
All schedule scalars are 0-d float32 tensors, so a step keeps the dtype of the sample it is given.
"""
import torch

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULERS = ("pndm", "ddim")  # the names sample.py, evaluate.py and OutpaintOptions accept (first: the default)


def alphas_cumprod(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012):
    """The scaled_linear schedule: betas = linspace(sqrt(start), sqrt(end), T)^2, cumprod(1 - beta), float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, with t an int or a (B,) tensor (one per batch item)."""
    if x0.shape != noise.shape:
        raise ValueError(f"add_noise expects noise of shape {tuple(x0.shape)} (like x0), received {tuple(noise.shape)}")
    t = torch.as_tensor(t, device=alphas_cumprod.device).long().reshape(-1)
    if t.numel() not in (1, x0.shape[0]):
        raise ValueError(f"add_noise expects 1 or {x0.shape[0]} timesteps (one per batch item), received {t.numel()}")
    if t.min() < 0 or t.max() >= len(alphas_cumprod):
        raise ValueError(f"add_noise expects timesteps in [0, {len(alphas_cumprod) - 1}], received {t.tolist()}")
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    a = a.reshape(-1, *([1] * (x0.dim() - 1)))  # (B or 1, 1, ...)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def randn_like_on(x, generator=None):
    """Standard normal noise shaped like x, drawn on the generator's device (so a CPU generator works for CUDA x)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _check_steps(num_inference_steps, num_train_timesteps):
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
            or not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be an int in [1, {num_train_timesteps}], "
                         f"received {num_inference_steps!r}")


def _check_step_inputs(name, eps, t, sample, num_train_timesteps):
    if not torch.is_tensor(eps) or not torch.is_tensor(sample) or eps.shape != sample.shape:
        shapes = [tuple(v.shape) if torch.is_tensor(v) else type(v).__name__ for v in (eps, sample)]
        raise ValueError(f"{name}.step expects eps and sample tensors of the same shape, "
                         f"received {shapes[0]} and {shapes[1]}")
    if not (eps.is_floating_point() and sample.is_floating_point()):
        raise ValueError(f"{name}.step expects floating-point tensors, received {eps.dtype} and {sample.dtype}")
    t = int(t)
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"{name}.step expects a timestep in [0, {num_train_timesteps - 1}], received {t}")
    return t


def leading_timesteps(num_inference_steps, steps_offset=1, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """Ascending "leading" grid: 0, r, 2r, ... with r = T // steps, plus steps_offset."""
    _check_steps(num_inference_steps, num_train_timesteps)
    ratio = num_train_timesteps // num_inference_steps
    return torch.arange(num_inference_steps, dtype=torch.long) * ratio + steps_offset


class PNDMScheduler:
    """PLMS (PNDM with skip_prk_steps) exactly as diffusers runs it for SD-1.5.

    timesteps has N + 1 entries: the leading grid reversed with its second entry doubled (981, 961, 961, ...,
    21, 1 for N = 50). The second call to step() is a "redo": it goes from t + r to t, starting again from
    the sample saved at the first call, with eps = mean of the first two eps. The M3DDM reference starts at
    strength 1.0 and loops over timesteps[1:] (see start_index), so its first call is at 961, not 981.
    """

    order = 1

    def __init__(self, num_inference_steps=50, num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085,
                 beta_end=0.012, steps_offset=1):
        _check_steps(num_inference_steps, num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        self.final_alpha_cumprod = self.alphas_cumprod[0]  # set_alpha_to_one=False
        self.ratio = num_train_timesteps // num_inference_steps
        grid = leading_timesteps(num_inference_steps, steps_offset, num_train_timesteps)
        self.timesteps = torch.cat([grid[:-1], grid[-2:-1], grid[-1:]]).flip(0)  # (N + 1,)
        self.reset()

    def reset(self):
        self.ets, self.counter, self.cur_sample = [], 0, None

    def start_index(self, strength=1.0):
        """Index into timesteps where the reference sampler starts (and noises x_T): 1 at strength 1.0.

        init = min(int(N * strength) + 1, N); the loop is timesteps[start:], x_T is noised at timesteps[start].
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], received {strength}")
        init = min(int(self.num_inference_steps * strength) + 1, self.num_inference_steps)
        return len(self.timesteps) - init

    def step(self, eps, t, sample):
        t = _check_step_inputs("PNDMScheduler", eps, t, sample, self.num_train_timesteps)
        t_prev = t - self.ratio
        if self.counter != 1:
            self.ets = self.ets[-3:] + [eps]
        else:  # the redo: same step as the first call, one grid step earlier
            t_prev, t = t, t + self.ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            e, self.cur_sample = eps, sample
        elif len(ets) == 1 and self.counter == 1:
            e, sample, self.cur_sample = (eps + ets[-1]) / 2, self.cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        return self._prev_sample(sample, t, t_prev, e)

    def _prev_sample(self, x, t, t_prev, e):
        a = self.alphas_cumprod[t]
        ap = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        denom = a * (1 - ap) ** 0.5 + (a * (1 - a) * ap) ** 0.5
        return (ap / a) ** 0.5 * x - (ap - a) * e / denom


class DDIMScheduler:
    """DDIM with SD-1.5 settings; eta = 0 is deterministic, eta > 0 draws noise from `generator`."""

    order = 1

    def __init__(self, num_inference_steps=50, eta=0.0, num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                 beta_start=0.00085, beta_end=0.012, steps_offset=1):
        _check_steps(num_inference_steps, num_train_timesteps)
        if not eta >= 0:
            raise ValueError(f"DDIM eta must be >= 0, received {eta}")
        self.num_inference_steps, self.eta = num_inference_steps, float(eta)
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        self.final_alpha_cumprod = self.alphas_cumprod[0]  # set_alpha_to_one=False
        self.ratio = num_train_timesteps // num_inference_steps
        self.timesteps = leading_timesteps(num_inference_steps, steps_offset, num_train_timesteps).flip(0)  # (N,)

    def reset(self):
        pass  # DDIM keeps no state between steps

    def step(self, eps, t, sample, generator=None):
        t = _check_step_inputs("DDIMScheduler", eps, t, sample, self.num_train_timesteps)
        t_prev = t - self.ratio
        a = self.alphas_cumprod[t]
        ap = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        x0 = (sample - (1 - a) ** 0.5 * eps) / a ** 0.5
        variance = ((1 - ap) / (1 - a)) * (1 - a / ap)
        std = self.eta * variance ** 0.5
        prev = ap ** 0.5 * x0 + (1 - ap - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            noise = randn_like_on(eps, generator)
            prev = prev + std * noise
        return prev
