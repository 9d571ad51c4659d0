"""selfalign: align a base language model without human preference labels.

Implements Self-Align (Dromedary), ALMoST (synthetic feedback) and the HHH laboratory
(Askell et al.) as stages of a recipe that run over a resumable run folder.
"""

__version__ = "0.1.0"
