"""The methods, one package per paper: `self_align` (Dromedary), `almost` (ALMoST), `hhh_lab`
(Askell et al. 2021), plus the plain `generate` stage they all use."""
