from refcond import hookimpl
