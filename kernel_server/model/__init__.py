"""The model room: loading, the registry, sites, interventions, validation of user input,
one-shot analysis passes, device maps, exact decode attention."""
