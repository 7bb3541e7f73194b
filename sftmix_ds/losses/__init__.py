from .fused import Head, auto_chunk_rows, fused_sftmix_loss, head_logits, reference_sftmix_loss

__all__ = ["Head", "auto_chunk_rows", "fused_sftmix_loss", "head_logits", "reference_sftmix_loss"]
