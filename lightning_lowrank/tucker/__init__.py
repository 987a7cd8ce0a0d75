"""The Tucker method: factorized layers, the rank-adaptive integrator and the model surgery around them.

Nothing here imports Lightning. One concept per module: ``layers`` (one factorized layer's math and storage),
``forms`` (what each form of a layer's forward costs), ``attention`` (multi-head attention with four Tucker
projections), ``integrator`` (the step schedule), ``augmentation`` (basis augmentation and the core's gradient),
``truncation`` (the rank decision and its application), ``optimizer_state`` (optimizer state carried through rotations
and resizes), ``distributed`` (collectives and DDP arrangement), ``conversion`` (dense to Tucker), ``summary`` (ranks
and parameter counts).
"""
