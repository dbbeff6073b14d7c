"""Integrations with other libraries. Each lives in its own module and imports its library only when that module is
imported: ``import fastdiff`` never needs them (``fastdiff.integrations.diffusers`` needs ``pip install
fastdiff[diffusers]``)."""
