-- Reverses 0009: a fenced database would serve keys again, so refuse while a fence is set.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM keyserver_fence) THEN
        RAISE EXCEPTION 'this database is fenced (its keys moved with keyserver db cutover); run keyserver db unfence first if it is to serve again';
    END IF;
END $$;
DROP TABLE keyserver_fence;
