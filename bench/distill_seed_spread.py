"""FD spread over sampling seeds of the 1-step CD student of bench/distill_digits.py (n = 1000 each):
    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_seed_spread.py"""
import torch
from diffcli.checkpoint import load_checkpoint
from diffcli.data import load_dataset
from diffcli.features import digits_frechet_distance
from diffcli.generate import SampleSettings, generate
torch.set_num_threads(1)
p = "bench/out/distill/consistency/last.safetensors"
ck = load_checkpoint(p)
ref = load_dataset(ck.recipe.data).images
for seed in (0, 1, 2, 3):
    s = SampleSettings(sampler="consistency", steps=1, n=1000, seed=seed, batch_size=500)
    imgs, _ = generate(ck.denoiser, 1, 8, s, device=torch.device("cpu"), show_progress=False)
    print(seed, round(digits_frechet_distance(imgs, ref), 3))
