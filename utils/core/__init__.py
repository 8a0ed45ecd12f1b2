"""The course's infrastructure (hand-written; no chapter teaches it): where files live
(`paths`), which device to use (`device`), the registry of downloadable files (`assets`) and
the one function that fetches them (`download`). Every chapter module may import from here;
nothing here imports a chapter.
"""
