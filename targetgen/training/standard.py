"""The standard GAN step: the PyTorch DCGAN tutorial's training loop body, end to end.

Kept as an independent baseline (``--targets standard``) so that its
equivalence with the decomposed step is tested rather than assumed. The code
follows the tutorial line for line, including its names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.optim as optim
from torch import Tensor

from ..api import Batch, require_finite
from ..config import StandardOptions
from ..discriminators import Penalty
from ..distributed import unwrap

# Establish convention for real and fake labels during training
real_label = 1.0
fake_label = 0.0


class StandardGAN:
    def __init__(
        self,
        options: StandardOptions,
        netG: nn.Module,
        netD: nn.Module,
        sample_latents: Callable[[int], Tensor],
        d_steps: int = 1,
        penalty: Penalty | None = None,
    ):
        self.netG, self.netD = netG, netD
        self.penalty = penalty or Penalty()  # the discriminator section's R1 / R2, none by default
        self.sample_latents = sample_latents
        self.d_steps = d_steps  # D updates per G update (n_critic), each on fresh noise
        # Initialize BCELoss function
        self.criterion = nn.BCELoss()
        # Setup Adam optimizers for both G and D
        self.optimizerD = optim.Adam(netD.parameters(), lr=options.d_lr, betas=options.betas)
        self.optimizerG = optim.Adam(netG.parameters(), lr=options.g_lr, betas=options.betas)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def step(self, batch: Batch, step: int, log: bool) -> dict[str, Tensor]:
        netG, netD, criterion = self.netG, self.netD, self.criterion
        device = next(netD.parameters()).device
        ############################
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        ###########################
        for _ in range(self.d_steps):  # the tutorial's one D step; n_critic with targets.d_steps
            ## Train with all-real batch
            netD.zero_grad()
            # Format batch
            real_cpu = batch.images.to(device)
            b_size = real_cpu.size(0)
            label = torch.full((b_size,), real_label, dtype=real_cpu.dtype, device=device)
            # Forward pass real batch through D
            output = require_finite(netD(real_cpu).view(-1), "D(x)")
            # Calculate loss on all-real batch
            errD_real = criterion(output, label)
            # Calculate gradients for D in backward pass
            errD_real.backward()
            D_x = output.mean().detach()  # the tutorial's .item(), left to the loop: one read per step

            ## Train with all-fake batch
            # Generate batch of latent vectors
            noise = self.sample_latents(b_size)
            # Generate fake image batch with G
            fake = netG(noise)
            label.fill_(fake_label)
            # Classify all fake batch with D
            output = require_finite(netD(fake.detach()).view(-1), "D(G(z))")
            # Calculate D's loss on the all-fake batch
            errD_fake = criterion(output, label)
            # Calculate the gradients for this batch, accumulated (summed) with previous gradients
            errD_fake.backward()
            D_G_z1 = output.mean().detach()
            # Compute error of D as sum over the fake and the real batches
            errD = errD_real + errD_fake
            # targetgen: the discriminator regularizers (R1 / R2), when configured
            if (penalty := self.penalty(netD, real_cpu, fake, step)) is not None:
                penalty.backward()
            # Update D
            self.optimizerD.step()

        ############################
        # (2) Update G network: maximize log(D(G(z)))
        ###########################
        netG.zero_grad()
        label.fill_(real_label)  # fake labels are real for generator cost
        # Since we just updated D, perform another forward pass of all-fake batch through D
        output = require_finite(netD(fake).view(-1), "D(G(z)) after the discriminator step")
        # Calculate G's loss based on this output
        errG = criterion(output, label)
        # Calculate gradients for G
        errG.backward()
        D_G_z2 = output.mean().detach()
        # Update G
        self.optimizerG.step()

        return {
            "d_loss": errD.detach(),
            "g_loss": errG.detach(),
            "d_real": D_x,
            "d_fake": D_G_z1,
            "d_fake_after_d_step": D_G_z2,
        }

    def sampling_generator(self) -> nn.Module:
        return unwrap(self.netG)

    def sampler(self, ema: bool = False) -> nn.Module:
        return unwrap(self.netG)

    def discriminator(self) -> nn.Module:
        return unwrap(self.netD)

    def state_dict(self) -> dict:
        return {
            "netD": unwrap(self.netD).state_dict(),
            "optimizerD": self.optimizerD.state_dict(),
            "optimizerG": self.optimizerG.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.netD).load_state_dict(state["netD"])
        self.optimizerD.load_state_dict(state["optimizerD"])
        self.optimizerG.load_state_dict(state["optimizerG"])
