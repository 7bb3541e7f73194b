from .fused import auto_chunk_rows, fused_sftmix_loss, reference_sftmix_loss

__all__ = ["auto_chunk_rows", "fused_sftmix_loss", "reference_sftmix_loss"]
