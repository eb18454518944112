"""Template network / full-sequence 3D CNN of seed 000 (adaptive PromptNet, Fig. 1, Table 1)."""
from models.fs3dcnn.family import FAMILY
from models.fs3dcnn.loss import classification_loss, fs3dcnn_loss
from models.fs3dcnn.network import FS3DOutput, FullSequence3DCNN

__all__ = ["FAMILY", "FS3DOutput", "FullSequence3DCNN", "classification_loss", "fs3dcnn_loss"]
