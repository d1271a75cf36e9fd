"""Reserved for the interventions and LoRA jobs."""
