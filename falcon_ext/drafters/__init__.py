"""The drafters: prompt lookup, Falcon (its model, tree plan and checkpoint format), and the
union of several drafters' trees. The folders beside these modules are the shipped drafter
checkpoints, loadable by name."""
