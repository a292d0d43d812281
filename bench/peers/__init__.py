"""The designs pgpush is measured against, written by us: nchan (+ relay) and three Python servers."""
