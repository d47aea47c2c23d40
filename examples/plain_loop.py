"""GMT in a plain PyTorch loop: loss.backward(); masker.apply(); optimizer.step()."""

import torch

from gmt_plugins import GradientMasker

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
masker = GradientMasker(model, mask_ratio=0.2, strict=True)
x, y = torch.randn(256, 32), torch.randn(256, 1)
for step in range(3):
    torch.nn.functional.mse_loss(model(x), y).backward()
    stats = masker.apply()
    optimizer.step()
    masker.restore_masked()
    optimizer.zero_grad()
    print(f"step {stats.step}: masked {stats.masked}/{stats.total} ({stats.fraction:.3f}), threshold_max {max(stats.thresholds()):.2e}")
