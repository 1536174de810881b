"""Privacy and security: update validation, clipping + Gaussian noise, privacy accounting."""
