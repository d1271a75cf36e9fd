"""lsn: the command line on top of harvester (statistics into a store), analysis (masks) and jobs
(interventions, fine-tuning, the demo). It imports from all three; none of them imports it."""
