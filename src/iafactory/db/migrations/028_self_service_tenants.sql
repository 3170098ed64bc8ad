-- 028: self-service tenants (issue 13). A signed-in user creates a tenant (plan free, status
-- trial) and becomes its owner, in one transaction: the slug's reservation, the tenant, the
-- owner's membership and their audit events (`tenant.created`, `member.added`: the tables' triggers,
-- with the request's user, address and request id) are written together or not at all.
-- The user is the request's own (app.user_id), never a parameter. At most p_max_trials tenants in
-- trial owned by one account (in this cell), against abuse; the user's row is locked so that two
-- concurrent creates by one person count each other.
CREATE OR REPLACE FUNCTION app.create_own_tenant(p_id uuid, p_name text, p_slug text, p_region text,
                                                 p_trial_days integer, p_max_trials integer)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_user integer := app.current_user_id();
    v_trials integer;
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'creating a tenant needs a signed-in user' USING ERRCODE = 'IA403';
    END IF;
    PERFORM 1 FROM public.users u WHERE u.id = v_user AND u.is_active FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this account is not active' USING ERRCODE = 'IA403';
    END IF;
    SELECT count(*) INTO v_trials FROM app.user_memberships(v_user) m WHERE m.role = 'owner' AND m.status = 'trial';
    IF v_trials >= p_max_trials THEN
        RAISE EXCEPTION 'you already own % tenants in trial, the most one account may create; '
                        'upgrade one or ask the platform team', v_trials USING ERRCODE = 'IA403';
    END IF;
    INSERT INTO public.tenant_slugs (slug, tenant) VALUES (p_slug, p_id);  -- a taken slug: unique_violation
    RETURN QUERY
        INSERT INTO public.tenants (id, name, slug, region, plan, status, settings, metadata, trial_ends_at)
        VALUES (p_id, p_name, p_slug, p_region, 'free', 'trial', '{}'::jsonb, '{}'::jsonb,
                now() + make_interval(days => p_trial_days))
        RETURNING id, name, slug, region, plan, status, admin_email, admin_phone, settings, metadata,
                  created_at, updated_at, trial_ends_at;
    INSERT INTO public.tenant_users (tenant_id, user_id, role) VALUES (p_id, v_user, 'owner');
END
$$;

CALL app.lock_down_functions();
