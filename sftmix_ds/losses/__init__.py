from .fused import fused_sftmix_loss, reference_sftmix_loss

__all__ = ["fused_sftmix_loss", "reference_sftmix_loss"]
