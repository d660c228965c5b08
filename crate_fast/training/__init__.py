"""What train.py uses that is not the training loop itself (torchtitan's components, one file each):

- :mod:`.flags`: the command line read from a config dataclass (each field's comment is its --help);
- :mod:`.recipes`: the defaults per --data source and the named recipes; ``resolve`` fills and checks a run;
- :mod:`.objectives`: what a run optimizes and how it is evaluated (classification, masked autoencoding);
- :mod:`.runs`: run checkpoints (writer, reader, resume decision and checks, every rank's RNG state);
- :mod:`.optim`: Lion, the warmup + cosine schedule, weight-decay groups, the optimizer of a run;
- :mod:`.dist`: process groups and the few collectives the loop needs.
"""
