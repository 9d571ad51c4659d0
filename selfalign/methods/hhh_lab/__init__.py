"""The HHH laboratory (Askell et al. 2021): context distillation, preference-model objectives,
preference-model pre-training, prompt gain."""
