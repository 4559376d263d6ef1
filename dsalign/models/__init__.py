"""Models: the region/sentence alignment model (paper Eqs. 1-6) and its ranking loss (Eq. 9)."""

from dsalign.models.alignment import AlignmentConfig, AlignmentModel
from dsalign.models.losses import local_ranking_loss, ranking_loss

__all__ = ["AlignmentConfig", "AlignmentModel", "local_ranking_loss", "ranking_loss"]
