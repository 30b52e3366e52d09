"""Flag groups that several programs share; each module defines one group and turns it into its library config.

Library modules take configs (data.InputConfig, model.ModelConfig, trainer.OptimConfig) and define no flags; a
program calls the define functions of the groups it uses, so that its --help lists exactly those.
"""
