"""Downstream nuclei segmentation and classification: HoVer-Net from MONAI, trained on real and
synthetic patches, to measure what DiffMix's synthetic data is worth.

* :mod:`.targets` -- HoVer-Net training targets (nucleus pixels, horizontal/vertical maps, types)
  from instance and type maps, through ``monai.transforms.ComputeHoVerMaps``.
* :mod:`.nets` -- the networks: MONAI's ``HoVerNet`` (fast mode, the paper/GPU preset) and a
  CPU-sized variant (a MONAI ``BasicUNet`` trunk with the three HoVer-Net heads); both return
  MONAI's ``HoVerNetBranch`` dict, so ``HoVerNetLoss`` and MONAI's post-processing apply unchanged.
* :mod:`.data` -- training sources (real dataset roots, synthetic ``.npy`` folders, GradMix image
  folders) and the seeded real/synthetic batch mix.
* :mod:`.train` -- the training run (fixed step budget, resumable, bf16 on GPU).
* :mod:`.predict` -- inference, MONAI post-processing, CoNSeP-style ``.mat`` predictions.
* :mod:`.study` -- the utility study (arms x seeds, table, chart, report).
* :mod:`.fidelity` -- the label-fidelity check of synthetic patches.

torch, MONAI and scikit-image are imported only here, never by the label-only modules.
"""
