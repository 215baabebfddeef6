"""Context modules: turn a batch's demos (or its puzzle id) into the decoder's prefix context."""

from etrm.config import ENCODER_TYPES, ArchConfig
from etrm.errors import EtrmError


def build_encoder(arch: ArchConfig):
    if arch.encoder_type == "puzzle_embedding":
        from etrm.models.puzzle_embedding import PuzzleEmbeddingContext

        return PuzzleEmbeddingContext(arch)
    raise EtrmError(f"arch.encoder_type={arch.encoder_type!r} is not one of {', '.join(ENCODER_TYPES)}")
