"""The library face a notebook imports (`import patchscan as ps`): states, target prompts, readouts,
their results, lenses and interventions, all on the one engine."""
