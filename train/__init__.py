if __name__ == "train":  # the old import name (deprecated): the same module as backbone_router.train
    from backbone_router._compat import alias_old_name

    alias_old_name(__name__)
