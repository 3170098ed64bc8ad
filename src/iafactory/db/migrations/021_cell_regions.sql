-- 021: a cell serves some regions and refuses, in the database, a tenant of any other.
--
-- Data residency (issue 12): each region's tenants live in the cell (database) that serves that
-- region. The cell records the regions it serves in cell_regions: `iafactory migrate` writes them
-- from IAFACTORY_CELLS after migrating; until then (or with psql alone) this database is the only
-- cell and serves all five regions, as before. A trigger refuses a tenant row whose region is not
-- among them, on insert and on a change of region, whoever writes it — the application, a
-- definer function, the owner role — so a routing bug cannot put a tenant's data in the wrong
-- country. The tenant row is the root of all its data: no other tenant row can exist without it.

CREATE TABLE IF NOT EXISTS cell_regions (
    region varchar(2) PRIMARY KEY CHECK (region IN ('DZ', 'CH', 'FR', 'BE', 'CA')),
    cell   text NOT NULL CHECK (cell ~ '^[a-z][a-z0-9-]{0,31}$')
);
ALTER TABLE cell_regions OWNER TO iaf_owner;
REVOKE ALL ON cell_regions FROM PUBLIC;
GRANT SELECT ON cell_regions TO iaf_app;

INSERT INTO cell_regions (region, cell)
VALUES ('DZ', 'default'), ('CH', 'default'), ('FR', 'default'), ('BE', 'default'), ('CA', 'default')
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION app.refuse_foreign_region() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_cell text;
BEGIN
    -- A value that is no region at all is left to the tenants_region_valid constraint to name.
    IF NEW.region IN ('DZ', 'CH', 'FR', 'BE', 'CA')
       AND NOT EXISTS (SELECT 1 FROM public.cell_regions c WHERE c.region = NEW.region) THEN
        SELECT string_agg(DISTINCT c.cell, ', ') INTO v_cell FROM public.cell_regions c;
        RAISE EXCEPTION 'region % is not served by this cell (%)', NEW.region, coalesce(v_cell, 'no region')
            USING ERRCODE = 'check_violation',
                  HINT = 'a tenant lives in the cell that serves its region (IAFACTORY_CELLS)';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER tenants_region_served BEFORE INSERT OR UPDATE OF region ON tenants
    FOR EACH ROW EXECUTE FUNCTION app.refuse_foreign_region();

CALL app.lock_down_functions();
