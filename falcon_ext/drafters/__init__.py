"""The drafters: prompt lookup and Falcon (its model, tree plan and checkpoint format). The
folders beside these modules are the shipped drafter checkpoints, loadable by name."""
