"""jobs: what a mask's neurons do. Interventions (perplexity matrix, generation), LoRA restricted to a
language's neurons, and the end-to-end demo. Imports from harvester and analysis only."""
