"""Plain / residual / highway / pre-activation CIFAR nets and the block anatomy of any supported ResNet."""
from .anatomy import LESION_MODES, Anatomy, BlockAnatomy, anatomy, check_lesion_mode
from .declared import COMBINES, BlockDeclaration, declare_block, declared_blocks
from .blocks import SHORTCUT_OPTIONS
from .grouped import GroupedCifarNet, grouped_cross_entropy
from .cifar import FAMILIES, CifarNet, blocks_per_stage, build_model, count_parameters, default_gate_bias
from .fold import count_batchnorms, fold_batchnorm
from .compiled import EVALUATION_PATHS, compile_blocks, evaluation_model

__all__ = ["Anatomy", "BlockAnatomy", "BlockDeclaration", "COMBINES", "CifarNet", "EVALUATION_PATHS", "FAMILIES",
           "GroupedCifarNet", "LESION_MODES", "SHORTCUT_OPTIONS", "anatomy", "blocks_per_stage", "build_model",
           "check_lesion_mode", "compile_blocks", "count_batchnorms", "count_parameters", "declare_block",
           "declared_blocks", "default_gate_bias", "evaluation_model", "fold_batchnorm", "grouped_cross_entropy"]
