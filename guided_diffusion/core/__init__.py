"""The bottom layer, imported by everything else and importing nothing of the project above it: errors,
atomic files and the weights-only checkpoint container, devices and precision, threads, the allocator
policy, the distributed context and the seed streams."""
