from .imageset import ImageSet
