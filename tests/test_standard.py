"""One step of the standard trainer is the PyTorch DCGAN tutorial's step."""

import copy

import torch
import torch.nn as nn
import torch.optim as optim

from targetgen.api import Batch
from targetgen.training import build_run


def tutorial_step(netG, netD, optimizerG, optimizerD, real_cpu, nz):
    # Copied from the PyTorch DCGAN tutorial's training loop (one iteration).
    criterion = nn.BCELoss()
    real_label, fake_label = 1.0, 0.0
    netD.zero_grad()
    b_size = real_cpu.size(0)
    label = torch.full((b_size,), real_label, dtype=torch.float)
    output = netD(real_cpu).view(-1)
    errD_real = criterion(output, label)
    errD_real.backward()
    noise = torch.randn(b_size, nz, 1, 1)
    fake = netG(noise)
    label.fill_(fake_label)
    output = netD(fake.detach()).view(-1)
    errD_fake = criterion(output, label)
    errD_fake.backward()
    optimizerD.step()
    netG.zero_grad()
    label.fill_(real_label)
    output = netD(fake).view(-1)
    errG = criterion(output, label)
    errG.backward()
    optimizerG.step()
    return errD_real + errD_fake, errG


def test_one_trainer_step_equals_the_tutorial_step(tiny_config):
    run = build_run(tiny_config("data.image_size=32", "model.nz=100", targets="standard"))
    netG, netD = copy.deepcopy(run.generator), copy.deepcopy(run.strategy.netD)
    optimizerD = optim.Adam(netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
    real = run.data.dataset.images[:32]

    rng = torch.get_rng_state()
    stats = run.strategy.step(Batch(real, torch.arange(32)), 0, log=True)
    torch.set_rng_state(rng)
    errD, errG = tutorial_step(netG, netD, optimizerG, optimizerD, real, 100)

    assert stats["d_loss"] == errD.item() and stats["g_loss"] == errG.item()
    for mine, theirs in ((run.generator, netG), (run.strategy.netD, netD)):
        for (name, p), q in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
